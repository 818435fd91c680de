// Package node is one machine's atrest: it owns the key custody (package keystore), the
// registry of volumes and drives (package registry), the unlocked drives, the volumes,
// their NBD exports and an event stream, and answers the operations every front end
// needs (Service): status, rotation, formatting and adopting drives, listing, subscribing
// to events. The design is in docs/design.md.
//
// A Node opened with Open is offline: it reads the keystore and the registry afresh for
// each call and holds nothing, so that a command run while no daemon serves the keystore
// does what the daemon would. Start makes it serve: it unlocks every volume's drives
// (held exclusively), exports each volume on its NBD server, and from then on a drive
// added through it is exported at once. Shutdown drains and flushes.
//
// Locks: changes take the custody lock (keystore.Locked), then the registry's
// (registry.Tx), in that order; a rotation runs under the custody lock and records its
// outcome in the registry before it clears its journal. Other processes honour the same
// locks, so an offline command and the daemon never step on each other.
//
// A Node is safe for concurrent use.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/registry"
)

// Config configures a Node. Keystore is required; every other zero value is usable.
type Config struct {
	// Keystore is the keystore directory.
	Keystore string
	// Logger receives the node's log lines (the events, and what the layers below
	// report). Nil discards them.
	Logger *slog.Logger
	// Version is reported by Identity.
	Version string

	// What Start serves and how.

	// Drives restricts what Start serves to the registered drives at these paths or
	// glob patterns (as `atrest serve DRIVE...` names them); none: every active drive of
	// the registry.
	Drives []string
	// ReadOnly exports every volume read-only (and opens the drives read-only).
	ReadOnly bool
	// Direct opens the drives with O_DIRECT.
	Direct bool
	// SharedWriters turns the NBD server's one-writer rule off (docs/nbd.md): for
	// benchmarks and clients that coordinate themselves.
	SharedWriters bool
	// NBD tunes the NBD server's limits (its Logf is the node's).
	NBD nbd.ServerConfig

	// now, for tests.
	now func() time.Time
}

// Node is one machine's atrest; see the package documentation.
type Node struct {
	cfg    Config
	dir    string // the keystore directory, absolute
	log    *slog.Logger
	events *bus
	now    func() time.Time

	// rotating is held by the rotation that runs in this process, so that a second one
	// is refused at once (another process's is refused by the custody lock).
	rotating sync.Mutex

	mu      sync.Mutex
	srv     *nbd.Server       // set by Start
	volumes map[string]*vol   // by volume UUID, while serving
	closed  bool              // Shutdown ran
	started time.Time         // when Start finished
	failed  map[string]string // volume UUID → why Start or AddDrive could not serve it
}

// Open opens the node of the keystore in cfg.Keystore, offline: it checks that the
// keystore and its registry open, and holds nothing.
func Open(ctx context.Context, cfg Config) (*Node, error) {
	if cfg.Keystore == "" {
		return nil, fmt.Errorf("no keystore directory: %w", ErrInvalid)
	}
	dir, err := filepath.Abs(cfg.Keystore)
	if err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	now := cfg.now
	if now == nil {
		now = func() time.Time { return time.Now().UTC() }
	}
	n := &Node{cfg: cfg, dir: dir, log: log, events: newBus(), now: now, volumes: map[string]*vol{}, failed: map[string]string{}}
	if _, _, err := n.snapshot(ctx); err != nil {
		return nil, err
	}
	return n, nil
}

// Dir is the keystore directory (absolute; a keystore is never a symlink: keystore
// refuses one).
func (n *Node) Dir() string { return n.dir }

// snapshot reads the custody state and the registry, without locks: the registry.json
// beside a keystore.json of version 2 (none yet: an empty registry), or the one a
// keystore.json of version 1 describes (a registry.json beside it is ignored: a
// migration that crashed may have left one, which the next locked change derives again).
func (n *Node) snapshot(ctx context.Context) (*keystore.Keystore, *registry.Registry, error) {
	k, err := keystore.Open(n.dir)
	if err != nil {
		return nil, nil, err
	}
	if k.V1() {
		r, err := k.LegacyRegistry()
		return k, r, err
	}
	s := registry.NewFileStore(n.dir)
	r, err := s.Load(ctx)
	if errors.Is(err, registry.ErrNoRegistry) {
		return k, registry.New(k.ClusterUUID()), nil
	}
	if err != nil {
		return nil, nil, err
	}
	if r.ClusterUUID != k.ClusterUUID() {
		return nil, nil, fmt.Errorf("%s is of cluster %s, the keystore of cluster %s: %w", s.Location(), r.ClusterUUID, k.ClusterUUID(), registry.ErrCorrupt)
	}
	return k, r, nil
}

// lock takes the custody lock and migrates a keystore.json of version 1 (under the
// registry lock, which it releases again): every change starts here.
func (n *Node) lock(ctx context.Context) (*keystore.Locked, error) {
	l, err := keystore.Lock(n.dir)
	if err != nil {
		return nil, err
	}
	if l.V1() {
		tx, err := registry.NewFileStore(n.dir).Begin(ctx)
		if err == nil {
			err = l.MigrateV1(tx)
			tx.Close()
		}
		if err != nil {
			l.Close()
			return nil, fmt.Errorf("migrate keystore.json version 1: %w", err)
		}
		n.log.Info("migrated keystore.json to version 2 and registry.json", "keystore", n.dir)
	}
	return l, nil
}

// begin takes the registry lock; the custody lock l must be held (the order is custody,
// then registry).
func (n *Node) begin(ctx context.Context, l *keystore.Locked) (*registry.Tx, error) {
	s := registry.NewFileStore(n.dir)
	tx, err := s.Begin(ctx)
	if err != nil {
		return nil, err
	}
	switch c := tx.Registry().ClusterUUID; c {
	case "":
		tx.Reset(registry.New(l.ClusterUUID()))
	case l.ClusterUUID():
	default:
		tx.Close()
		return nil, fmt.Errorf("%s is of cluster %s, the keystore of cluster %s: %w", s.Location(), c, l.ClusterUUID(), registry.ErrCorrupt)
	}
	return tx, nil
}

// Identity says which keystore and cluster the node manages.
func (n *Node) Identity(ctx context.Context) (*Identity, error) {
	k, err := keystore.Open(n.dir)
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	id := &Identity{Keystore: n.dir, ClusterUUID: k.ClusterUUID(), Hostname: host, Version: n.cfg.Version}
	if n.serving() {
		id.Serving, id.PID = true, os.Getpid()
	}
	return id, nil
}

// serving reports whether Start has run and Shutdown has not.
func (n *Node) serving() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.srv != nil && !n.closed
}

// ValidVolumeName reports whether name can name a volume: 1 to 64 letters, digits,
// '.', '_' or '-', starting with a letter or digit (it is an NBD export name and a
// path element).
func ValidVolumeName(name string) bool { return registry.ValidVolumeName(name) }
