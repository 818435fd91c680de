package keystore

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/google/uuid"
)

// DefaultDir is the keystore's place on the boot drive; EnvDir overrides it, and the
// command's --keystore flag overrides both.
const (
	DefaultDir = "/var/lib/atrest"
	EnvDir     = "ATREST_KEYSTORE"
)

// Keystore is an open keystore directory.
type Keystore struct {
	dir   string
	state *State
	lockF *os.File // nil for a read-only snapshot
	now   func() time.Time
	// resumed: Init kept the master.key of an interrupted init.
	resumed bool
}

// Dir is the keystore directory.
func (k *Keystore) Dir() string { return k.dir }

// State returns a copy of keystore.json as loaded (or last written by this Keystore).
func (k *Keystore) State() State {
	s := *k.state
	s.Drives = slices.Clone(s.Drives)
	if s.Rotation != nil {
		r := *s.Rotation
		r.Drives = slices.Clone(r.Drives)
		s.Rotation = &r
	}
	return s
}

// Drives returns the registry.
func (k *Keystore) Drives() []Drive { return slices.Clone(k.state.Drives) }

// Init creates a keystore in dir: the directory (mode 0700) if it does not exist,
// a new master key, keystore.json with a new cluster UUID, and the lock file. It
// refuses a directory that already holds keystore.json or master.key.next. The
// returned Keystore holds the lock.
//
// Init writes master.key before keystore.json. If it finds a master.key without a
// keystore.json (an init killed between the two writes), it finishes that init with
// the key it finds rather than refusing or replacing it: no drive can use the key
// yet, but the administrator may already have copied it away; InitResumed says so.
func Init(dir string) (*Keystore, error) {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, err
	}
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	exists := func(name string) bool {
		_, err := os.Lstat(filepath.Join(dir, name))
		return err == nil
	}
	for _, name := range []string{StateFile, NextKeyFile} {
		if exists(name) {
			return nil, fmt.Errorf("%s: %w", filepath.Join(dir, name), ErrExists)
		}
	}
	lf, err := lock(dir)
	if err != nil {
		return nil, err
	}
	k := &Keystore{dir: dir, lockF: lf, now: nowUTC}
	// Checked again under the lock: another init may have finished meanwhile.
	if exists(StateFile) {
		k.Close()
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, StateFile), ErrExists)
	}
	var key []byte
	if exists(MasterKeyFile) {
		if key, err = readKey(filepath.Join(dir, MasterKeyFile)); err != nil {
			k.Close()
			return nil, fmt.Errorf("an earlier init left %w", err)
		}
		k.resumed = true
	} else {
		key = newMasterKey()
	}
	defer clear(key)
	now := k.now()
	k.state = &State{
		Format: FormatName, Version: FormatVersion,
		ClusterUUID: uuid.NewString(), Created: now,
		MasterKey: KeyInfo{ID: KeyID(key), Created: now},
		Drives:    []Drive{},
	}
	// The key first: a keystore.json always names a key that exists.
	if !k.resumed {
		if err := writeAtomic(dir, MasterKeyFile, key); err != nil {
			k.Close()
			return nil, err
		}
	}
	if err := k.save(); err != nil {
		k.Close()
		return nil, err
	}
	return k, nil
}

// InitResumed reports whether Init finished an interrupted init, keeping the
// master.key it found.
func (k *Keystore) InitResumed() bool { return k.resumed }

func nowUTC() time.Time { return time.Now().UTC().Truncate(time.Second) }

// Open loads the keystore in dir as a read-only snapshot, without the lock, after
// checking the directory and its files (owner, mode, no symlinks).
func Open(dir string) (*Keystore, error) {
	if err := checkDir(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", dir, ErrNoKeystore)
		}
		return nil, err
	}
	k := &Keystore{dir: dir, now: nowUTC}
	if err := k.load(); err != nil {
		return nil, err
	}
	return k, nil
}

// OpenLocked is Open holding the keystore lock, for the commands that change the
// keystore or a header. It fails with ErrBusy if another process holds it.
func OpenLocked(dir string) (*Keystore, error) {
	if err := checkDir(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", dir, ErrNoKeystore)
		}
		return nil, err
	}
	if _, err := os.Lstat(filepath.Join(dir, StateFile)); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", dir, ErrNoKeystore)
	}
	lf, err := lock(dir)
	if err != nil {
		return nil, err
	}
	k := &Keystore{dir: dir, lockF: lf, now: nowUTC}
	if err := k.load(); err != nil {
		k.Close()
		return nil, err
	}
	return k, nil
}

// load reads and checks keystore.json and master.key (which must be the key the
// state names, or, once a rotation has reached its commit phase, its new key).
//
// Without the lock, a rotation in another process may replace both files between
// the two reads: the pair read then does not match although each file is sound. An
// unlocked load therefore reads keystore.json again when they disagree and starts
// over if it changed. Once master.key holds a new key it never goes back, so a state
// read unchanged on both sides of the key read is the state that goes with the key.
func (k *Keystore) load() error {
	const attempts = 20 // loadOnce answers errStateMoved only without the lock
	for i := 1; ; i++ {
		err := k.loadOnce()
		if err == nil || i == attempts || !errors.Is(err, errStateMoved) {
			return err
		}
	}
}

// testHookStateRead, when set by a test, runs between the reads of the two files.
var testHookStateRead func()

// errStateMoved is what loadOnce answers when keystore.json changed under it.
var errStateMoved = errors.New("keystore.json changed while it was read")

func (k *Keystore) loadOnce() error {
	p := filepath.Join(k.dir, StateFile)
	b, err := readSecure(p, maxStateSize)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%s: %w", k.dir, ErrNoKeystore)
		}
		return err
	}
	s, err := ParseState(b)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	k.state = s
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
		if k.lockF == nil {
			if again, rerr := readSecure(p, maxStateSize); rerr == nil && !bytes.Equal(again, b) {
				return fmt.Errorf("%w: %w", errStateMoved, err)
			}
		}
		return err
	}
	// The other files must be safe too.
	for _, name := range []string{LockFile, NextKeyFile} {
		if err := checkPath(filepath.Join(k.dir, name), false); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// save writes keystore.json atomically. Only a locked Keystore writes.
func (k *Keystore) save() error {
	if k.lockF == nil {
		panic("BUG: keystore: save without the lock")
	}
	return writeAtomic(k.dir, StateFile, k.state.Marshal())
}

// Close releases the lock, if held.
func (k *Keystore) Close() error {
	if k.lockF == nil {
		return nil
	}
	err := k.lockF.Close()
	k.lockF = nil
	return err
}

// masterKeys returns the keys that may open a drive now, with their ids: the
// master key, and during a rotation the next key too (if its file exists). The
// caller zeroes them.
func (k *Keystore) masterKeys() ([]namedKey, error) {
	var keys []namedKey
	for _, name := range []string{MasterKeyFile, NextKeyFile} {
		key, err := readKey(filepath.Join(k.dir, name))
		if err != nil {
			if name == NextKeyFile && errors.Is(err, fs.ErrNotExist) {
				continue
			}
			zeroKeys(keys)
			return nil, err
		}
		keys = append(keys, namedKey{id: KeyID(key), key: key})
	}
	return keys, nil
}

type namedKey struct {
	id  string
	key []byte
}

func zeroKeys(keys []namedKey) {
	for _, k := range keys {
		clear(k.key)
	}
}

// lockHeld reports whether this Keystore holds the lock (for assertions).
func (k *Keystore) lockHeld() bool { return k.lockF != nil }
