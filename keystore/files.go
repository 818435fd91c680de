package keystore

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// File names inside the keystore directory.
const (
	MasterKeyFile = "master.key"
	NextKeyFile   = "master.key.next"
	StateFile     = "keystore.json"
	LockFile      = "lock"
)

// MasterKeySize is the size of the master key: 32 random bytes, used as the
// passphrase (cryptsetup --key-file) of each drive's atrest keyslot.
const MasterKeySize = 32

var (
	// ErrUnsafe: a keystore file or the directory is a symlink, not a regular file
	// (or directory), owned by someone else, or readable by group or others.
	ErrUnsafe = errors.New("unsafe keystore")
	// ErrCorrupt: a keystore file does not parse or contradicts itself.
	ErrCorrupt = errors.New("corrupt keystore")
	// ErrNoKeystore: the directory has no keystore.
	ErrNoKeystore = errors.New("no keystore")
	// ErrExists: Init found a keystore (or part of one) already there.
	ErrExists = errors.New("keystore already exists")
	// ErrBusy: another process holds the keystore lock.
	ErrBusy = errors.New("another atrest process holds the keystore lock")
)

// UnsafeError is a keystore path that breaks the ownership and permission rules, with
// what fixes it. It wraps ErrUnsafe.
type UnsafeError struct {
	Path    string
	Problem string // what is wrong with it: "is a symlink", "has mode 0644, ..."
	Fix     string // what the administrator can do about it, "" if nothing obvious
}

func (e *UnsafeError) Error() string { return fmt.Sprintf("%s %s: %v", e.Path, e.Problem, ErrUnsafe) }
func (e *UnsafeError) Unwrap() error { return ErrUnsafe }

// checkOwnerMode applies the ownership and permission rules (OpenSSH StrictModes):
// owned by root or by the user running atrest (root in production), and nothing for
// group or others.
func checkOwnerMode(path string, st *unix.Stat_t, dir bool) error {
	kind, what, mode := uint32(unix.S_IFREG), "regular file", "0600"
	if dir {
		kind, what, mode = unix.S_IFDIR, "directory", "0700"
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		return symlinkError(path, what)
	}
	if st.Mode&unix.S_IFMT != kind {
		return &UnsafeError{Path: path, Problem: "is not a " + what}
	}
	if st.Uid != 0 && int(st.Uid) != os.Geteuid() {
		return &UnsafeError{Path: path, Problem: fmt.Sprintf("is owned by uid %d", st.Uid), Fix: "chown root:root " + path}
	}
	if perm := st.Mode & 0o777; perm&0o077 != 0 {
		return &UnsafeError{Path: path, Problem: fmt.Sprintf("has mode %04o, which grants access to group or others", perm), Fix: fmt.Sprintf("chmod %s %s", mode, path)}
	}
	return nil
}

// symlinkError refuses a keystore path that is a symlink to a regular file or a
// directory (what).
func symlinkError(path, what string) error {
	return &UnsafeError{Path: path, Problem: "is a symlink", Fix: "replace it with the " + what + " it points to"}
}

// checkParents applies the rules to the directories above the keystore, as OpenSSH
// does for the directories above authorized_keys: each must be owned by root (or the
// user running atrest) and not writable by group or others, unless its sticky bit is
// set (/tmp, /var/tmp), where others cannot rename or remove what they do not own.
// Otherwise whoever may write there could move the keystore aside and put their own
// in its place. The path is walked as given and as resolved through symlinks.
func checkParents(dir string) error {
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
				return &UnsafeError{Path: q, Problem: fmt.Sprintf("(above the keystore %s) is owned by uid %d", dir, st.Uid), Fix: "chown root " + q + ", or move the keystore"}
			}
			if st.Mode&0o022 != 0 && st.Mode&unix.S_ISVTX == 0 {
				return &UnsafeError{Path: q, Problem: fmt.Sprintf("(above the keystore %s) is writable by group or others", dir), Fix: "chmod go-w " + q + ", or move the keystore"}
			}
			if q == "/" {
				break
			}
		}
	}
	return nil
}

// checkDir checks the keystore directory and the directories above it.
func checkDir(dir string) error {
	if err := checkPath(dir, true); err != nil {
		return err
	}
	return checkParents(dir)
}

// checkPath lstat()s path and applies the rules; a missing path wraps fs.ErrNotExist.
func checkPath(path string, dir bool) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return &os.PathError{Op: "lstat", Path: path, Err: err}
	}
	return checkOwnerMode(path, &st, dir)
}

// readSecure reads a keystore file through a descriptor opened without following
// symlinks and checked with fstat, so that the file checked is the file read.
func readSecure(path string, max int64) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, symlinkError(path, "regular file")
		}
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if err := checkOwnerMode(path, &st, false); err != nil {
		return nil, err
	}
	if st.Size > max {
		return nil, fmt.Errorf("%s is %d bytes, more than the %d expected: %w", path, st.Size, max, ErrCorrupt)
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

// readKey reads a master key file: exactly MasterKeySize bytes.
func readKey(path string) ([]byte, error) {
	b, err := readSecure(path, MasterKeySize)
	if err != nil {
		return nil, err
	}
	if len(b) != MasterKeySize {
		clear(b)
		return nil, fmt.Errorf("%s is %d bytes, not a %d-byte master key: %w", path, len(b), MasterKeySize, ErrCorrupt)
	}
	return b, nil
}

// KeyID is the public name of a master key: a truncated SHA-256 of the key under a
// domain prefix. It identifies the key in keystore.json, headers and status output
// without revealing anything usable about it.
func KeyID(key []byte) string {
	h := sha256.New()
	h.Write([]byte("atrest master key id v1\x00"))
	h.Write(key)
	return "mk-" + hex.EncodeToString(h.Sum(nil)[:8])
}

func newMasterKey() []byte {
	k := make([]byte, MasterKeySize)
	rand.Read(k)
	return k
}

// writeAtomic replaces dir/name with data, mode 0600: a temporary file in the same
// directory, written and fsynced, renamed over the name, then the directory fsynced.
// A crash leaves the old file or the new one, never a mix; at worst a stray
// temporary file, which nothing reads.
func writeAtomic(dir, name string, data []byte) error {
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
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return err
	}
	ok = true
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync() // its error names dir
}

// lock takes the keystore lock: an exclusive flock on dir/lock, not waiting.
func lock(dir string) (*os.File, error) {
	p := filepath.Join(dir, LockFile)
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, symlinkError(p, "regular file")
		}
		return nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	f := os.NewFile(uintptr(fd), p)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, err
	}
	if err := checkOwnerMode(p, &st, false); err != nil {
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
