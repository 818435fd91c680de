package discovery

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Ranks of names, most preferred first (see the package doc).
const (
	rankGiven = iota
	rankByID
	rankLink
	rankDevice
	rankFile
)

// name is one path under which a device was found, as the listing saw it.
type name struct {
	path string // as found
	real string // with every symlink resolved
	rank int
	key  Key    // identity from stat
	mode uint32 // file type from stat
	size int64  // regular files: size from stat
}

func (a name) compare(b name) int {
	return cmp.Or(cmp.Compare(a.rank, b.rank), cmp.Compare(a.path, b.path))
}

func (a name) less(b name) bool { return a.compare(b) < 0 }

// group is the names that share an identity before any device is opened.
type group struct {
	key   Key
	names []name // most preferred first
}

// groupByIdentity groups names by key, keeping the order of first appearance.
func groupByIdentity(names []name) []*group {
	byKey := make(map[Key]*group)
	var out []*group
	for _, n := range names {
		g := byKey[n.key]
		if g == nil {
			g = &group{key: n.key}
			byKey[n.key] = g
			out = append(out, g)
		}
		g.names = append(g.names, n)
	}
	for _, g := range out {
		slices.SortFunc(g.names, name.compare)
	}
	return out
}

// errTooMany is the problem reported when a scan reaches Options.MaxNames.
var errTooMany = errors.New("too many names")

// lister collects the names of one scan.
type lister struct {
	s        *Scanner
	ctx      context.Context
	given    map[string]bool
	seen     map[string]int // path -> index in names
	names    []name
	problems []error
	full     bool // MaxNames reached
}

// list stats every name the sources give, keeping block devices and regular files.
// It fails only when ctx ends.
func (s *Scanner) list(ctx context.Context, src Sources) ([]name, []error, error) {
	l := &lister{s: s, ctx: ctx, given: make(map[string]bool), seen: make(map[string]int)}
	for _, p := range src.Paths {
		l.given[p] = true
	}
	for _, p := range src.Paths {
		l.add(p, true)
	}
	for _, p := range src.Patterns {
		l.pattern(p)
	}
	for _, d := range src.Dirs {
		if err := l.dir(d, "*"); err != nil {
			l.problem(fmt.Errorf("directory %s: %w", d, err))
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	return l.names, l.problems, nil
}

func (l *lister) problem(err error) { l.problems = append(l.problems, err) }

// room reports whether another name may be looked at, and reports the problem once
// when not.
func (l *lister) room() bool {
	if l.ctx.Err() != nil {
		return false
	}
	if len(l.seen) < l.s.maxNames {
		return true
	}
	if !l.full {
		l.full = true
		l.problem(fmt.Errorf("%w: looked at %d names (Options.MaxNames), the rest were not scanned", errTooMany, l.s.maxNames))
	}
	return false
}

// pattern lists the names that match the glob p.
func (l *lister) pattern(p string) {
	dir, base := filepath.Split(p)
	dir = filepath.Clean(dir)
	dirs := []string{dir}
	if hasMeta(dir) {
		var err error
		if dirs, err = filepath.Glob(dir); err != nil {
			panic("BUG: discovery: pattern checked by SetSources: " + err.Error())
		}
	}
	for _, d := range dirs {
		if !hasMeta(base) {
			l.add(filepath.Join(d, base), false)
			continue
		}
		err := l.dir(d, base)
		if err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTDIR) {
			l.problem(fmt.Errorf("pattern %s: %w", p, err))
		}
	}
}

// dir lists the entries of d that match the glob base, reading the directory in
// chunks and no more than Options.MaxNames entries.
func (l *lister) dir(d, base string) error {
	f, err := os.Open(d)
	if err != nil {
		return err
	}
	defer f.Close()
	read := 0
	for l.room() {
		entries, err := f.ReadDir(256)
		for _, e := range entries {
			if ok, _ := filepath.Match(base, e.Name()); ok {
				l.add(filepath.Join(d, e.Name()), false)
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if read += len(entries); read >= l.s.maxNames {
			return fmt.Errorf("%w: read %d entries (Options.MaxNames), the rest were not scanned", errTooMany, read)
		}
	}
	return nil
}

// add looks at one path. Only block devices and regular files become names; a given
// path that is neither is a problem, anything else is skipped quietly.
func (l *lister) add(p string, given bool) {
	if !l.room() {
		return
	}
	if i, ok := l.seen[p]; ok {
		if given {
			l.names[i].rank = rankGiven
		}
		return
	}
	skip := func(why string, args ...any) {
		if given {
			l.problem(fmt.Errorf("path %s: "+why, append([]any{p}, args...)...))
		} else {
			l.s.log.Debug("discovery: skipped", "path", p, "why", fmt.Sprintf(why, args...))
		}
	}
	var lst, st unix.Stat_t
	if err := unix.Lstat(p, &lst); err != nil {
		if !given || !errors.Is(err, unix.ENOENT) {
			skip("%v", err)
		}
		return // a given path that does not exist is simply not there now
	}
	st = lst
	link := lst.Mode&unix.S_IFMT == unix.S_IFLNK
	if link {
		if err := unix.Stat(p, &st); err != nil {
			skip("link to nothing usable: %v", err)
			return
		}
	}
	n := name{path: p, real: p, mode: st.Mode & unix.S_IFMT}
	switch n.mode {
	case unix.S_IFBLK:
		n.key, n.rank = blockKey(unix.Major(st.Rdev), unix.Minor(st.Rdev)), rankDevice
	case unix.S_IFREG:
		n.key, n.rank, n.size = fileKey(unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino), rankFile, st.Size
	default:
		skip("%s, not a block device or regular file", fileType(n.mode))
		return
	}
	if link {
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			skip("%v", err)
			return
		}
		n.real = real
		n.rank = rankLink
		if strings.HasPrefix(p, ByIDDir+"/") {
			n.rank = rankByID
		}
	}
	if given || l.given[p] {
		n.rank = rankGiven
	}
	l.seen[p] = len(l.names)
	l.names = append(l.names, n)
}

func hasMeta(s string) bool { return strings.ContainsAny(s, `*?[\`) }

// fileType names a file type for messages.
func fileType(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFREG:
		return "a regular file"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return fmt.Sprintf("file type %#o", mode&unix.S_IFMT)
}
