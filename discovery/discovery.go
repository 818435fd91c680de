package discovery

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/atrest/atrest/luks2"
)

// Classes of Candidate.Err: why a candidate has no usable atrest token. Each Err
// matches exactly one of them with errors.Is, and wraps the underlying error too.
var (
	// ErrNotLUKS: the device holds no LUKS2 header.
	ErrNotLUKS = errors.New("no LUKS2 header")
	// ErrUnsupported: a LUKS2 header outside the profile atrest reads (another
	// program's drive, most likely).
	ErrUnsupported = errors.New("LUKS2 header not supported by atrest")
	// ErrDamaged: both copies of the LUKS2 header are damaged.
	ErrDamaged = errors.New("LUKS2 header damaged")
	// ErrNoToken: a valid LUKS2 header without an atrest token.
	ErrNoToken = errors.New("no atrest token")
	// ErrBadToken: the header's atrest token is unreadable (two of them, an unknown
	// version, impossible fields).
	ErrBadToken = errors.New("atrest token unreadable")
	// ErrIO: the device could not be opened or read.
	ErrIO = errors.New("device could not be read")
	// ErrNotAnswering: the device did not answer within Options.ProbeTimeout.
	ErrNotAnswering = errors.New("device not answering")
)

// Defaults of Options.
const (
	DefaultProbeTimeout = 2 * time.Second
	DefaultParallel     = 8
	DefaultMaxNames     = 10000
)

// ByIDDir is where udev makes the stable names of drives.
const ByIDDir = "/dev/disk/by-id"

// FallbackPatterns are the kernel's names of drives, for machines without udev (see
// the package doc).
var FallbackPatterns = []string{"/dev/sd*", "/dev/vd*", "/dev/xvd*", "/dev/nvme*n*", "/dev/mmcblk*", "/dev/loop*"}

// DefaultPatterns returns the patterns to scan when the operator gives none:
// ByIDDir/* where that directory exists, FallbackPatterns otherwise.
func DefaultPatterns() []string {
	if fi, err := os.Stat(ByIDDir); err == nil && fi.IsDir() {
		return []string{ByIDDir + "/*"}
	}
	return slices.Clone(FallbackPatterns)
}

// Sources say where to look (see the package doc).
type Sources struct {
	// Patterns are absolute globs in path/filepath.Match syntax.
	Patterns []string
	// Paths are explicit paths of drives or image files; they are preferred names.
	Paths []string
	// Dirs are directories whose every entry is looked at.
	Dirs []string
}

// Options configure a Scanner. The zero value of every field but Sources means its
// default.
type Options struct {
	Sources
	// ProbeTimeout bounds each device's probe; DefaultProbeTimeout if 0.
	ProbeTimeout time.Duration
	// Parallel is how many probes run at once; DefaultParallel if 0.
	Parallel int
	// MaxNames bounds the names a scan looks at, and the entries it reads from each
	// directory; DefaultMaxNames if 0.
	MaxNames int
	// Logger receives debug lines about skipped names and warnings; nil discards.
	Logger *slog.Logger
}

// Kind says what a candidate is.
type Kind string

const (
	// KindBlock is a block device (including a loop device over a block device).
	KindBlock Kind = "block"
	// KindFile is a regular file (an image file) with no loop device over it.
	KindFile Kind = "file"
	// KindLoop is a loop device over a regular file; the file is among Paths if a
	// source found it, and is BackingFile in any case.
	KindLoop Kind = "loop"
)

// Key is the identity of a device: "dev:MAJOR:MINOR" for a block device (its st_rdev),
// "ino:MAJOR:MINOR:INODE" for a regular file (its st_dev and st_ino), which is also the
// key of every loop device over that file. Equal keys mean the same device.
type Key string

func blockKey(major, minor uint32) Key { return Key(fmt.Sprintf("dev:%d:%d", major, minor)) }

func fileKey(major, minor uint32, ino uint64) Key {
	return Key(fmt.Sprintf("ino:%d:%d:%d", major, minor, ino))
}

// Candidate is one device and what its header says.
type Candidate struct {
	Key  Key
	Kind Kind
	// Path is the name to open: Paths[0].
	Path string
	// Paths are every name under which the device was found, most preferred first.
	Paths []string
	// BackingFile is, for a loop device, its backing file as the kernel names it
	// (with " (deleted)" if it was deleted); "" otherwise.
	BackingFile string
	// Size in bytes; 0 if the device did not answer.
	Size int64
	// UUID and Label of the LUKS2 header; "" without one.
	UUID  string
	Label string
	// Token is the atrest token, nil without one (then Err says why).
	Token *luks2.AtrestToken
	// HeaderWarning says that one header copy is damaged or stale (the other is
	// used); the header is never repaired here.
	HeaderWarning error
	// Err is nil when Token is set, otherwise one of the classes above.
	Err error
	// Duplicate is set when another candidate's header has the same UUID.
	Duplicate bool
}

// Snapshot is the result of one scan.
type Snapshot struct {
	// Time is when the scan started.
	Time time.Time
	// Candidates, ordered by Path.
	Candidates []Candidate
	// Problems are sources that could not be looked at in full (an unreadable
	// directory, a given path that is no drive, too many names).
	Problems []error
}

// ByUUID returns the candidates whose header UUID is uuid (more than one: duplicates).
func (s *Snapshot) ByUUID(uuid string) []Candidate {
	var out []Candidate
	for _, c := range s.Candidates {
		if c.UUID == uuid {
			out = append(out, c)
		}
	}
	return out
}

// Scanner scans the Sources it was given. It is safe for concurrent use.
type Scanner struct {
	timeout  time.Duration
	parallel int
	maxNames int
	log      *slog.Logger

	mu       sync.Mutex
	sources  Sources
	inflight map[Key]*inflight // probes running, by the key of the name they opened
	known    map[Key]identity  // the last scan's identities, by the key of the name

	// late receives a value when a probe that a scan gave up on has returned (the
	// Watcher then rescans).
	late chan struct{}
}

// New checks the options and returns a Scanner.
func New(opts Options) (*Scanner, error) {
	s := &Scanner{
		timeout:  cmp.Or(opts.ProbeTimeout, DefaultProbeTimeout),
		parallel: cmp.Or(opts.Parallel, DefaultParallel),
		maxNames: cmp.Or(opts.MaxNames, DefaultMaxNames),
		log:      opts.Logger,
		inflight: make(map[Key]*inflight),
		late:     make(chan struct{}, 1),
	}
	if s.timeout < 0 || s.parallel < 0 || s.maxNames < 0 {
		return nil, errors.New("discovery: negative probe timeout, parallelism or name limit")
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if err := s.SetSources(opts.Sources); err != nil {
		return nil, err
	}
	return s, nil
}

// SetSources replaces the sources; the next scan uses them. Paths are made absolute
// (relative to the working directory).
func (s *Scanner) SetSources(src Sources) error {
	var clean Sources
	for _, p := range src.Patterns {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("discovery: pattern %q is not absolute", p)
		}
		if _, err := filepath.Match(p, ""); err != nil {
			return fmt.Errorf("discovery: pattern %q: %w", p, err)
		}
		clean.Patterns = append(clean.Patterns, filepath.Clean(p))
	}
	for _, list := range []struct{ in, out *[]string }{{&src.Paths, &clean.Paths}, {&src.Dirs, &clean.Dirs}} {
		for _, p := range *list.in {
			a, err := filepath.Abs(p)
			if err != nil {
				return fmt.Errorf("discovery: %w", err)
			}
			*list.out = append(*list.out, a)
		}
	}
	s.mu.Lock()
	s.sources = clean
	s.mu.Unlock()
	return nil
}

func (s *Scanner) currentSources() Sources {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sources
}

// Scan looks at every source once and returns what it found. It fails only when ctx
// ends; sources that could not be looked at are in Snapshot.Problems.
func (s *Scanner) Scan(ctx context.Context) (*Snapshot, error) {
	snap := &Snapshot{Time: time.Now()}
	names, problems, err := s.list(ctx, s.currentSources())
	if err != nil {
		return nil, err
	}
	snap.Problems = problems
	groups := groupByIdentity(names)
	results, err := s.probeAll(ctx, groups)
	if err != nil {
		return nil, err
	}
	s.remember(groups, results)
	snap.Candidates = merge(groups, results)
	return snap, nil
}

// identity is what a probe learns about a name's device beyond its stat: a loop
// device's key is its backing file's.
type identity struct {
	key     Key
	kind    Kind
	backing string
}

// remember keeps the identities that the probes found, and gives a device that does
// not answer now the identity it had in the previous scan: a loop device whose
// backing file hangs stays the same candidate (Changed, not Vanished and Appeared).
func (s *Scanner) remember(groups []*group, results []probeResult) {
	s.mu.Lock()
	defer s.mu.Unlock()
	known := make(map[Key]identity, len(groups))
	for i, g := range groups {
		r := &results[i]
		switch {
		case r.gone:
		case errors.Is(r.err, ErrNotAnswering):
			if id, ok := s.known[g.key]; ok {
				r.key, r.kind, r.backing = id.key, id.kind, id.backing
				known[g.key] = id
			}
		default:
			known[g.key] = identity{key: r.key, kind: r.kind, backing: r.backing}
		}
	}
	s.known = known
}

// probeAll probes one name of each group, at most s.parallel at a time.
func (s *Scanner) probeAll(ctx context.Context, groups []*group) ([]probeResult, error) {
	results := make([]probeResult, len(groups))
	sem := make(chan struct{}, s.parallel)
	var wg sync.WaitGroup
	var err error
	for i, g := range groups {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			err = ctx.Err()
		}
		if err != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			results[i] = s.probeBounded(ctx, g)
		})
	}
	wg.Wait()
	if err == nil {
		err = ctx.Err()
	}
	return results, err
}

// merge turns the probed groups into candidates: groups that turned out to be the
// same device (a loop device and its backing file) become one, and candidates that
// share a header UUID are marked.
func merge(groups []*group, results []probeResult) []Candidate {
	type acc struct {
		names []name
		best  name
		res   probeResult
		loop  *probeResult // a loop device over the file, if one was found
	}
	byKey := make(map[Key]*acc)
	var order []Key
	for i, g := range groups {
		r := results[i]
		if r.gone {
			continue
		}
		a := byKey[r.key]
		if a == nil {
			a = &acc{}
			byKey[r.key] = a
			order = append(order, r.key)
		}
		if r.kind == KindLoop {
			a.loop = &results[i]
		}
		a.names = append(a.names, g.names...)
		// The header as read through the most preferred name is the one reported.
		if a.best.path == "" || g.names[0].less(a.best) {
			a.best, a.res = g.names[0], r
		}
	}
	out := make([]Candidate, 0, len(order))
	for _, k := range order {
		a := byKey[k]
		slices.SortFunc(a.names, name.compare)
		c := a.res.candidate(k)
		if a.loop != nil {
			c.Kind, c.BackingFile = KindLoop, a.loop.backing
		}
		for _, n := range a.names {
			c.Paths = append(c.Paths, n.path)
		}
		c.Path = c.Paths[0]
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b Candidate) int { return cmp.Compare(a.Path, b.Path) })
	byUUID := make(map[string]int)
	for _, c := range out {
		if c.UUID != "" {
			byUUID[c.UUID]++
		}
	}
	for i := range out {
		out[i].Duplicate = out[i].UUID != "" && byUUID[out[i].UUID] > 1
	}
	return out
}
