package registry

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/atrest/atrest/internal/securefile"
)

// Store keeps a registry. Implementations: FileStore (registry.json on the boot drive);
// a replicated store for a cluster of nodes implements the same interface.
type Store interface {
	// Load returns a snapshot of the registry, or an error matching ErrNoRegistry when
	// the store holds none.
	Load(ctx context.Context) (*Registry, error)
	// Begin takes the store's lock and returns a transaction over the registry as it is
	// under the lock. The lock is held until the Tx is closed.
	Begin(ctx context.Context) (*Tx, error)
	// Location says where the registry is kept, for messages.
	Location() string
}

// Tx is a change to a registry under its store's lock: read and change Registry, then
// Commit, which validates the whole registry and writes it atomically. Close releases
// the lock; a Tx closed without Commit changes nothing. Only a Store makes one (with
// NewTx), so holding a *Tx is holding the lock. A Tx is used by one goroutine.
type Tx struct {
	reg     *Registry
	write   func(*Registry) error
	release func() error
	closed  bool
}

// NewTx is for Store implementations: it returns a Tx over reg (which the Tx owns) that
// Commit passes to write (after validation) and Close ends with release.
func NewTx(reg *Registry, write func(*Registry) error, release func() error) *Tx {
	return &Tx{reg: reg, write: write, release: release}
}

// Registry is the registry under the lock, to read and change until Commit.
func (t *Tx) Registry() *Registry {
	if t.closed {
		panic("BUG: registry: Tx used after Close")
	}
	return t.reg
}

// Commit validates the registry and writes it. The Tx stays open (and its registry
// usable) for further changes and commits.
func (t *Tx) Commit() error {
	if t.closed {
		panic("BUG: registry: Commit after Close")
	}
	if err := t.reg.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return t.write(t.reg)
}

// Reset replaces the registry under the lock with r (for a store's first registry, or a
// migration that derives it whole); Commit writes it.
func (t *Tx) Reset(r *Registry) {
	if t.closed {
		panic("BUG: registry: Tx used after Close")
	}
	t.reg = r.Clone()
}

// Close releases the lock. Calling it again does nothing.
func (t *Tx) Close() error {
	if t.closed {
		return nil
	}
	t.closed = true
	return t.release()
}

// File names of FileStore inside its directory.
const (
	FileName     = "registry.json"
	LockFileName = "registry.lock"
)

// FileStore keeps the registry in a root-only directory on the boot drive (the
// keystore directory): registry.json, replaced atomically on each commit, and
// registry.lock, the flock that Begin takes (not waiting: a held lock is an error
// matching securefile.ErrBusy). The directory's safety (owner, mode, the directories
// above) is checked by whoever opened it (package keystore); FileStore checks each file
// it reads.
type FileStore struct {
	dir string
}

var _ Store = (*FileStore)(nil)

// NewFileStore returns the store of the registry in dir.
func NewFileStore(dir string) *FileStore { return &FileStore{dir: dir} }

// Location is the path of registry.json.
func (s *FileStore) Location() string { return filepath.Join(s.dir, FileName) }

// Load reads and validates registry.json.
func (s *FileStore) Load(_ context.Context) (*Registry, error) {
	b, err := securefile.ReadFile(s.Location(), maxSize)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", s.Location(), ErrNoRegistry)
	}
	if err != nil {
		return nil, err
	}
	r, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.Location(), err)
	}
	return r, nil
}

// Begin takes registry.lock and loads the registry. For a store without one yet, the Tx
// starts from a registry of no cluster, which the caller replaces (Tx.Reset) before the
// first Commit.
func (s *FileStore) Begin(ctx context.Context) (*Tx, error) {
	lf, err := securefile.Lock(s.dir, LockFileName)
	if err != nil {
		return nil, err
	}
	r, err := s.Load(ctx)
	if errors.Is(err, ErrNoRegistry) {
		r, err = &Registry{Format: FormatName, Version: FormatVersion, Volumes: []Volume{}, Drives: []Drive{}}, nil
	}
	if err != nil {
		lf.Close()
		return nil, err
	}
	return NewTx(r,
		func(r *Registry) error { return securefile.WriteAtomic(s.dir, FileName, r.Marshal()) },
		lf.Close), nil
}
