// Package securefile reads, writes and locks the files of atrest's state directory on the
// boot drive (the keystore's key files, keystore.json, registry.json) under one set of
// rules, those of OpenSSH's StrictModes: every file is a regular file (never a symlink),
// owned by root or by the user running atrest, and grants nothing to group or others;
// every directory above is owned by root (or that user) and not writable by group or
// others unless sticky. Writes are atomic (temporary file, fsync, rename, fsync of the
// directory), so a crash leaves the old file or the new one.
//
// The functions keep nothing in memory and are safe for concurrent use; Lock serialises
// processes (and Locks in one process) through flock.
package securefile

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

var (
	// ErrUnsafe: a file or directory is a symlink, of the wrong kind, owned by someone
	// else, or open to group or others. The error names the fix.
	ErrUnsafe = errors.New("unsafe file permissions")
	// ErrTooLarge: a file is larger than its reader allows.
	ErrTooLarge = errors.New("file larger than expected")
	// ErrBusy: another process (or another Lock in this one) holds the lock.
	ErrBusy = errors.New("lock held by another process")
)

// UnsafeError says what is wrong with a path and how to fix it; it matches ErrUnsafe.
type UnsafeError struct {
	Path    string
	Problem string // e.g. "is a symlink", "has mode 0644, which grants access to group or others"
	Fix     string // a shell command or advice, e.g. "chmod 0600 /var/lib/atrest/master.key"
}

func (e *UnsafeError) Error() string {
	return fmt.Sprintf("%s %s: %v", e.Path, e.Problem, ErrUnsafe)
}

func (e *UnsafeError) Unwrap() error { return ErrUnsafe }

// CheckMode applies the rules to what lstat or fstat said of path: a regular file (or a
// directory, if dir), owned by root or the user running atrest, nothing for group or
// others.
func CheckMode(path string, st *unix.Stat_t, dir bool) error {
	kind, want, fix := uint32(unix.S_IFREG), "a regular file", "0600"
	if dir {
		kind, want, fix = unix.S_IFDIR, "a directory", "0700"
	}
	switch {
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return &UnsafeError{Path: path, Problem: "is a symlink", Fix: "replace it with the " + want[2:] + " it points to"}
	case st.Mode&unix.S_IFMT != kind:
		return &UnsafeError{Path: path, Problem: "is not " + want}
	case st.Uid != 0 && int(st.Uid) != os.Geteuid():
		return &UnsafeError{Path: path, Problem: fmt.Sprintf("is owned by uid %d", st.Uid), Fix: "chown root:root " + path}
	case st.Mode&0o077 != 0:
		return &UnsafeError{Path: path, Problem: fmt.Sprintf("has mode %04o, which grants access to group or others", st.Mode&0o777),
			Fix: "chmod " + fix + " " + path}
	}
	return nil
}

// CheckPath lstat()s path and applies CheckMode; a missing path wraps fs.ErrNotExist.
func CheckPath(path string, dir bool) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return &os.PathError{Op: "lstat", Path: path, Err: err}
	}
	return CheckMode(path, &st, dir)
}

// CheckDir checks a state directory and every directory above it, as OpenSSH checks the
// directories above authorized_keys: each must be owned by root (or the user running
// atrest) and not writable by group or others unless its sticky bit is set (/tmp),
// where others cannot rename or remove what they do not own. Otherwise whoever may
// write there could move the directory aside and put their own in its place. The path
// is walked as given and as resolved through symlinks.
func CheckDir(dir string) error {
	if err := CheckPath(dir, true); err != nil {
		return err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	paths := []string{abs}
	if real, err := filepath.EvalSymlinks(abs); err == nil && real != abs {
		paths = append(paths, real)
	}
	for _, p := range paths {
		for q := filepath.Dir(p); ; q = filepath.Dir(q) {
			var st unix.Stat_t
			if err := unix.Stat(q, &st); err != nil {
				return &os.PathError{Op: "stat", Path: q, Err: err}
			}
			if st.Uid != 0 && int(st.Uid) != os.Geteuid() {
				return &UnsafeError{Path: q, Problem: fmt.Sprintf("(above %s) is owned by uid %d", dir, st.Uid),
					Fix: "chown root " + q + ", or move " + dir}
			}
			if st.Mode&0o022 != 0 && st.Mode&unix.S_ISVTX == 0 {
				return &UnsafeError{Path: q, Problem: fmt.Sprintf("(above %s) is writable by group or others", dir),
					Fix: "chmod go-w " + q + ", or move " + dir}
			}
			if q == "/" {
				break
			}
		}
	}
	return nil
}

// ReadFile reads path through a descriptor opened without following symlinks and
// checked with fstat, so that the file checked is the file read. A file larger than
// max fails with ErrTooLarge; a missing one wraps fs.ErrNotExist.
func ReadFile(path string, max int64) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, &UnsafeError{Path: path, Problem: "is a symlink", Fix: "replace it with the regular file it points to"}
		}
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if err := CheckMode(path, &st, false); err != nil {
		return nil, err
	}
	if st.Size > max {
		return nil, fmt.Errorf("%s is %d bytes, more than the %d expected: %w", path, st.Size, max, ErrTooLarge)
	}
	b := make([]byte, st.Size)
	if _, err := io.ReadFull(f, b); err != nil {
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			// Shrunk since fstat; the file's own errors name it.
			err = fmt.Errorf("read %s: %w", path, err)
		}
		return nil, err
	}
	return b, nil
}

// TestHookBeforeRename, when a test sets it, runs in WriteAtomic after the temporary
// file is durable and before it is renamed into place: a crash there is the crash
// between the two.
var TestHookBeforeRename func(dir, name string)

// WriteAtomic replaces dir/name with data, mode 0600: a temporary file in the same
// directory, written and fsynced, renamed over the name, then the directory fsynced.
// A crash leaves the old file or the new one, never a mix; at worst a stray temporary
// file, which nothing reads.
func WriteAtomic(dir, name string, data []byte) error {
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return err
	}
	// The errors of f name it (write PATH: ..., sync PATH: ...).
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if TestHookBeforeRename != nil {
		TestHookBeforeRename(dir, name)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return err
	}
	ok = true
	return SyncDir(dir)
}

// SyncDir fsyncs a directory, making the renames and creations in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync() // its error names dir
}

// Lock takes an exclusive flock on dir/name (created with mode 0600 if missing),
// without waiting: ErrBusy if it is held. Closing the returned file releases it.
func Lock(dir, name string) (*os.File, error) {
	p := filepath.Join(dir, name)
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, &UnsafeError{Path: p, Problem: "is a symlink", Fix: "remove it"}
		}
		return nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	f := os.NewFile(uintptr(fd), p)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, &os.PathError{Op: "fstat", Path: p, Err: err}
	}
	if err := CheckMode(p, &st, false); err != nil {
		f.Close()
		return nil, err
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", p, ErrBusy)
		}
		return nil, fmt.Errorf("flock %s: %w", p, err)
	}
	return f, nil
}
