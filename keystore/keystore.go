package keystore

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/google/uuid"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/internal/securefile"
	"github.com/atrest/atrest/registry"
)

// DefaultDir is the keystore's place on the boot drive; EnvDir overrides it, and the
// command's --keystore flag overrides both.
const (
	DefaultDir = "/var/lib/atrest"
	EnvDir     = "ATREST_KEYSTORE"
)

// Keystore is a read-only snapshot of a keystore directory, taken without the lock: the
// custody state as loaded (and, for a keystore.json of version 1, its drives). It is
// safe for concurrent use.
type Keystore struct {
	dir    string
	state  *State
	legacy []LegacyDrive // version 1 only
	now    func() time.Time
}

// Locked is a keystore held under its custody lock (an exclusive flock on dir/lock).
// Only a Locked changes the keystore, and only Lock and Init make one, so holding one is
// holding the lock. Its read methods (those of the embedded Keystore) see its own
// changes. A Locked is used by one goroutine; Close releases the lock.
type Locked struct {
	*Keystore
	lockF *os.File // nil once closed
	// resumed: Init kept the master.key of an interrupted init.
	resumed bool
}

// Dir is the keystore directory.
func (k *Keystore) Dir() string { return k.dir }

// ClusterUUID is the cluster the keystore's master key belongs to.
func (k *Keystore) ClusterUUID() string { return k.state.ClusterUUID }

// State returns a copy of the custody state as loaded (or last written by this Locked).
func (k *Keystore) State() State { return *k.state.clone() }

// Keys returns the master keys that may open a drive now, read from their files at each
// call: the master key, and during a rotation the next key too (if its file exists).
// The caller zeroes them. It is a drive.KeySource.
func (k *Keystore) Keys() ([]drive.Key, error) {
	var keys []drive.Key
	for _, name := range []string{MasterKeyFile, NextKeyFile} {
		key, err := readKey(filepath.Join(k.dir, name))
		if err != nil {
			if name == NextKeyFile && errors.Is(err, fs.ErrNotExist) {
				continue
			}
			drive.ZeroKeys(keys)
			return nil, err
		}
		keys = append(keys, drive.Key{ID: KeyID(key), Key: key})
	}
	return keys, nil
}

// Init creates a keystore in dir: the directory (mode 0700) if it does not exist, a new
// master key, keystore.json (version 2) with a new cluster UUID, and the lock file. It
// refuses a directory that already holds keystore.json, master.key.next or a registry.
// The returned Locked holds the lock.
//
// Init writes master.key before keystore.json. If it finds a master.key without a
// keystore.json (an init killed between the two writes), it finishes that init with the
// key it finds rather than refusing or replacing it: no drive can use the key yet, but
// the administrator may already have copied it away; InitResumed says so.
func Init(dir string) (*Locked, error) {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, err
	}
	if err := securefile.CheckDir(dir); err != nil {
		return nil, err
	}
	exists := func(name string) bool {
		_, err := os.Lstat(filepath.Join(dir, name))
		return err == nil
	}
	for _, name := range []string{StateFile, NextKeyFile, registry.FileName} {
		if exists(name) {
			return nil, fmt.Errorf("%s: %w", filepath.Join(dir, name), ErrExists)
		}
	}
	lf, err := securefile.Lock(dir, LockFile)
	if err != nil {
		return nil, err
	}
	l := &Locked{Keystore: &Keystore{dir: dir, now: nowUTC}, lockF: lf}
	// Checked again under the lock: another init may have finished meanwhile.
	if exists(StateFile) {
		l.Close()
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, StateFile), ErrExists)
	}
	var key []byte
	if exists(MasterKeyFile) {
		if key, err = readKey(filepath.Join(dir, MasterKeyFile)); err != nil {
			l.Close()
			return nil, fmt.Errorf("%w: %w", ErrStrayKey, err)
		}
		l.resumed = true
	} else {
		key = newMasterKey()
	}
	defer clear(key)
	now := l.now()
	l.state = &State{
		Format: FormatName, Version: FormatVersion,
		ClusterUUID: uuid.NewString(), Created: now,
		MasterKey: KeyInfo{ID: KeyID(key), Created: now},
	}
	// The key first: a keystore.json always names a key that exists.
	if !l.resumed {
		if err := securefile.WriteAtomic(dir, MasterKeyFile, key); err != nil {
			l.Close()
			return nil, err
		}
	}
	if err := l.save(); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// InitResumed reports whether Init finished an interrupted init, keeping the master.key
// it found.
func (l *Locked) InitResumed() bool { return l.resumed }

func nowUTC() time.Time { return time.Now().UTC().Truncate(time.Second) }

// Open loads the keystore in dir as a read-only snapshot, without the lock, after
// checking the directory, the directories above and its files (owner, mode, no
// symlinks).
func Open(dir string) (*Keystore, error) {
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	k := &Keystore{dir: dir, now: nowUTC}
	if err := k.load(false); err != nil {
		return nil, err
	}
	return k, nil
}

// Lock is Open holding the custody lock, for the operations that change the keystore or
// a drive's header. It fails with ErrBusy if another process holds it.
func Lock(dir string) (*Locked, error) {
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	if _, err := os.Lstat(filepath.Join(dir, StateFile)); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", dir, ErrNoKeystore)
	}
	lf, err := securefile.Lock(dir, LockFile)
	if err != nil {
		return nil, err
	}
	l := &Locked{Keystore: &Keystore{dir: dir, now: nowUTC}, lockF: lf}
	if err := l.load(true); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// checkDir checks the keystore directory and the directories above it.
func checkDir(dir string) error {
	if err := securefile.CheckDir(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%s: %w", dir, ErrNoKeystore)
		}
		return err
	}
	return nil
}

// load reads and checks keystore.json and master.key (which must be the key the state
// names, or, once a rotation has reached its commit phase, its new key).
//
// Without the lock, a rotation in another process may replace both files between the
// two reads: the pair read then does not match although each file is sound. An unlocked
// load therefore reads keystore.json again when they disagree and starts over if it
// changed. Once master.key holds a new key it never goes back, so a state read unchanged
// on both sides of the key read is the state that goes with the key.
func (k *Keystore) load(locked bool) error {
	const attempts = 20 // loadOnce answers errStateMoved only without the lock
	for i := 1; ; i++ {
		err := k.loadOnce(locked)
		if err == nil || i == attempts || !errors.Is(err, errStateMoved) {
			return err
		}
	}
}

// testHookStateRead, when set by a test, runs between the reads of the two files.
var testHookStateRead func()

// errStateMoved is what loadOnce answers when keystore.json changed under it.
var errStateMoved = errors.New("keystore.json changed while it was read")

func (k *Keystore) loadOnce(locked bool) error {
	p := filepath.Join(k.dir, StateFile)
	b, err := readState(p)
	if err != nil {
		return err
	}
	s, legacy, err := ParseState(b)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	k.state, k.legacy = s, legacy
	if testHookStateRead != nil {
		testHookStateRead()
	}
	key, err := readKey(filepath.Join(k.dir, MasterKeyFile))
	if err != nil {
		return err
	}
	defer clear(key)
	// In the commit phase of a rotation master.key is the old key, the old key
	// overwritten, or already the new key; otherwise it is the key the state names.
	if id := KeyID(key); id != s.MasterKey.ID && (s.Rotation == nil || s.Rotation.Phase != PhaseCommit) {
		err := fmt.Errorf("%s holds key %s but %s names %s: %w", MasterKeyFile, id, StateFile, s.MasterKey.ID, ErrCorrupt)
		if !locked {
			if again, rerr := readState(p); rerr == nil && !bytes.Equal(again, b) {
				return fmt.Errorf("%w: %w", errStateMoved, err)
			}
		}
		return err
	}
	// The other files must be safe too.
	for _, name := range []string{LockFile, NextKeyFile} {
		if err := securefile.CheckPath(filepath.Join(k.dir, name), false); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// readState reads keystore.json.
func readState(p string) ([]byte, error) {
	b, err := securefile.ReadFile(p, maxStateSize)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%s: %w", filepath.Dir(p), ErrNoKeystore)
	case errors.Is(err, securefile.ErrTooLarge):
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return b, err
}

// save writes keystore.json atomically.
func (l *Locked) save() error {
	if l.lockF == nil {
		return errClosed
	}
	if l.V1() {
		return fmt.Errorf("%s: %w", filepath.Join(l.dir, StateFile), ErrNotMigrated)
	}
	return securefile.WriteAtomic(l.dir, StateFile, l.state.Marshal())
}

// MasterKey returns the master key, to wrap a drive's data key with (format, adopt),
// which the caller zeroes. It refuses while a rotation is under way
// (ErrRotationUnderWay): a drive wrapped by the old key now would be left out of the
// rotation, whose drive list is fixed, and locked out when the old key is destroyed. It
// refuses a keystore.json of version 1 too (ErrNotMigrated): the drive would be recorded
// in a registry that the migration then derives again from version 1's drives.
func (l *Locked) MasterKey() (drive.Key, error) {
	if l.lockF == nil {
		return drive.Key{}, errClosed
	}
	if l.V1() {
		return drive.Key{}, fmt.Errorf("%s: %w", filepath.Join(l.dir, StateFile), ErrNotMigrated)
	}
	if l.state.Rotation != nil {
		return drive.Key{}, ErrRotationUnderWay
	}
	key, err := readKey(filepath.Join(l.dir, MasterKeyFile))
	if err != nil {
		return drive.Key{}, err
	}
	if id := KeyID(key); id != l.state.MasterKey.ID {
		clear(key)
		return drive.Key{}, fmt.Errorf("%s holds key %s but %s names %s: %w", MasterKeyFile, id, StateFile, l.state.MasterKey.ID, ErrCorrupt)
	}
	return drive.Key{ID: l.state.MasterKey.ID, Key: key}, nil
}

// Close releases the lock. Calling it again does nothing.
func (l *Locked) Close() error {
	if l.lockF == nil {
		return nil
	}
	err := l.lockF.Close()
	l.lockF = nil
	return err
}
