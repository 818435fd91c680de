package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/registry"
)

// vol is a volume being served: its unlocked drive and its exports.
type vol struct {
	uuid, name string
	drive      *drive.Unlocked
	exports    []string
	since      time.Time
}

var (
	// ErrNoDrive: a drive named to serve does not exist, or no drive matches a pattern.
	ErrNoDrive = errors.New("no such drive")
	// ErrServing: Start was called on a node that serves already, or after Shutdown.
	ErrServing = errors.New("the node serves already, or was shut down")
)

// Start makes the node serve: it unlocks the drives to serve (Config.Drives, or every
// active drive of the registry), each held exclusively so that no format, adoption or
// second daemon touches it, and exports each volume on the node's NBD server under its
// name, and also as the default export "" when it is the only one. A node with no
// drive yet starts too: a drive added later is exported at once. Start fails, and
// serves nothing, if a drive named or registered cannot be unlocked.
//
// Start does not listen: the caller hands listeners to Serve.
func (n *Node) Start(ctx context.Context) (err error) {
	n.mu.Lock()
	if n.srv != nil || n.closed {
		n.mu.Unlock()
		return ErrServing
	}
	cfg := n.cfg.NBD
	if cfg.Logger == nil {
		cfg.Logger = n.log
	}
	n.srv = nbd.NewServer(cfg)
	n.mu.Unlock()
	defer func() {
		if err != nil {
			n.Close()
		}
	}()

	k, r, err := n.snapshot(ctx)
	if err != nil {
		return err
	}
	paths, err := n.drivesToServe(r)
	if err != nil {
		return err
	}
	var unlocked []*drive.Unlocked
	defer func() {
		if err != nil {
			for _, d := range unlocked {
				d.Device.Close()
			}
		}
	}()
	for _, p := range paths {
		d, err := n.unlock(k, p, "")
		if err != nil {
			return err
		}
		unlocked = append(unlocked, d)
		for _, other := range unlocked[:len(unlocked)-1] {
			if other.Token.VolumeUUID == d.Token.VolumeUUID {
				return fmt.Errorf("drives %s and %s both hold volume %q: a volume is served from one drive (mirrors are not supported yet): %w", other.Path, d.Path, d.Token.Volume, ErrConflict)
			}
		}
	}
	for _, d := range unlocked {
		names := []string{d.Token.Volume}
		if len(unlocked) == 1 {
			names = append(names, "")
		}
		if err := n.export(d, names); err != nil {
			return err
		}
	}
	unlocked = nil // the node holds them now
	n.mu.Lock()
	n.started = n.now()
	n.mu.Unlock()
	n.emit(Event{Type: EventNodeStarted, Message: fmt.Sprintf("node started: %d volume(s) unlocked", len(paths))})
	return nil
}

// drivesToServe expands Config.Drives (paths or glob patterns), or lists the active
// drives of the registry when there are none (a stale drive is never served again).
func (n *Node) drivesToServe(r *registry.Registry) ([]string, error) {
	var paths []string
	if len(n.cfg.Drives) == 0 {
		for _, d := range r.Drives {
			if d.State == registry.DriveActive {
				paths = append(paths, d.Path)
			}
		}
		return paths, nil
	}
	for _, a := range n.cfg.Drives {
		matches, err := filepath.Glob(a)
		if err != nil {
			return nil, fmt.Errorf("drive pattern %q: %w: %w", a, ErrInvalid, err)
		}
		if len(matches) == 0 {
			if !strings.ContainsAny(a, `*?[\`) {
				return nil, fmt.Errorf("drive %s does not exist: %w: %w", a, ErrNoDrive, os.ErrNotExist)
			}
			return nil, fmt.Errorf("no drive matches %q: %w", a, ErrNoDrive)
		}
		paths = append(paths, matches...)
	}
	slices.Sort(paths)
	paths = slices.Compact(paths)
	// Two names of one drive (a link and its target): the second exclusive open would
	// fail against the first.
	seen := make([]os.FileInfo, len(paths))
	for i, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			continue // unlock says what is wrong with it
		}
		for j, other := range seen[:i] {
			if other != nil && os.SameFile(fi, other) {
				return nil, fmt.Errorf("drives %s and %s are the same drive: %w", paths[j], p, ErrInvalid)
			}
		}
		seen[i] = fi
	}
	return paths, nil
}

// unlock opens the drive at path for serving, held exclusively.
func (n *Node) unlock(k *keystore.Keystore, path, id string) (*drive.Unlocked, error) {
	d, err := drive.Unlock(path, drive.UnlockOptions{ClusterUUID: k.ClusterUUID(), UUID: id, Keys: k.Keys,
		ReadOnly: n.cfg.ReadOnly, Direct: n.cfg.Direct, Exclusive: true})
	if err != nil {
		if !strings.Contains(err.Error(), path) {
			err = fmt.Errorf("unlock %s: %w", path, err)
		}
		return nil, err
	}
	return d, nil
}

// export adds the exports of an unlocked drive's volume and records it as served; on
// failure the drive is closed.
func (n *Node) export(d *drive.Unlocked, names []string) error {
	vid, err := uuid.Parse(d.Token.VolumeUUID)
	if err != nil {
		d.Device.Close()
		return fmt.Errorf("drive %s: the atrest token's volume UUID %q: %w", d.Path, d.Token.VolumeUUID, err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.srv == nil || n.closed {
		d.Device.Close()
		return ErrServing
	}
	if _, ok := n.volumes[d.Token.VolumeUUID]; ok {
		d.Device.Close()
		return fmt.Errorf("volume %q (%s) is served already: %w", d.Token.Volume, d.Token.VolumeUUID, ErrConflict)
	}
	var added []string
	for _, name := range names {
		err := n.srv.AddExport(nbd.Export{
			Name:          name,
			Description:   fmt.Sprintf("atrest volume %s (drive %s)", d.Token.Volume, d.UUID),
			Device:        d.Device,
			ReadOnly:      n.cfg.ReadOnly,
			VolumeID:      nbd.VolumeID(vid),
			SharedWriters: n.cfg.SharedWriters,
		})
		if err != nil {
			for _, a := range added {
				n.srv.RemoveExport(context.Background(), a)
			}
			d.Device.Close()
			return fmt.Errorf("export volume %q as %q: %w", d.Token.Volume, name, err)
		}
		added = append(added, name)
	}
	v := &vol{uuid: d.Token.VolumeUUID, name: d.Token.Volume, drive: d, exports: names, since: n.now()}
	n.volumes[v.uuid] = v
	delete(n.failed, v.uuid)
	n.log.Info(fmt.Sprintf("unlocked %s: volume %q (%s), %d bytes, %d-byte sectors, key %s", d.Path, d.Token.Volume, d.Token.VolumeUUID, d.Device.Size(), d.SectorSize, d.KeyID),
		"volume", d.Token.Volume, "drive", d.UUID)
	n.events.publish(Event{Time: n.now(), Type: EventVolumeExported, Volume: v.name, Drive: d.UUID, Path: d.Path,
		Data: strings.Join(names, ","), Message: fmt.Sprintf("volume %s exported as %q", v.name, names)})
	return nil
}

// serveVolume unlocks and exports a registered volume of a serving node (a drive just
// added); why it could not is kept for the status.
func (n *Node) serveVolume(ctx context.Context, volumeUUID string) error {
	k, r, err := n.snapshot(ctx)
	if err == nil {
		v := r.VolumeByUUID(volumeUUID)
		if v == nil || len(v.Members) != 1 {
			err = fmt.Errorf("volume %s: not a registered volume of one drive: %w", volumeUUID, ErrNotFound)
		} else {
			d := r.Drive(v.Members[0])
			var u *drive.Unlocked
			if u, err = n.unlock(k, d.Path, d.UUID); err == nil {
				err = n.export(u, []string{v.Name})
			}
		}
	}
	if err != nil {
		n.mu.Lock()
		n.failed[volumeUUID] = err.Error()
		n.mu.Unlock()
	}
	return err
}

// servedVolume returns the volume if the node serves it.
func (n *Node) servedVolume(id string) *vol {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil
	}
	return n.volumes[id]
}

// failure says why a serving node could not serve a volume, if it tried and failed.
func (n *Node) failure(id string) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.failed[id]
}

// Exports lists the export names served.
func (n *Node) Exports() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.srv == nil {
		return nil
	}
	return n.srv.Exports()
}

// Serve serves NBD on l until Shutdown or Close (then it returns nbd.ErrServerClosed)
// or until ctx ends (then every connection is closed at once: a daemon that stops
// gracefully calls Shutdown instead).
func (n *Node) Serve(ctx context.Context, l net.Listener) error {
	n.mu.Lock()
	srv := n.srv
	n.mu.Unlock()
	if srv == nil {
		return fmt.Errorf("serve: %w", ErrOffline)
	}
	return srv.Serve(ctx, l)
}

// SelfCheck connects to the node's own listener at addr as a client and reads the
// first sector of every export, so that readiness is announced only when the exports
// really answer. It says it never writes, so it never holds a volume against a mount.
func (n *Node) SelfCheck(ctx context.Context, addr net.Addr) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, name := range n.Exports() {
		c, err := nbd.Dial(ctx, addr.Network()+":"+addr.String(), nbd.ClientOptions{Export: name, Connections: 1, ReconnectTimeout: -1, ReadOnly: true, Description: "atrest serve's self-check"})
		if err != nil {
			return fmt.Errorf("self-check of export %q: %w", name, err)
		}
		buf := make([]byte, min(4096, c.Size()))
		_, err = c.ReadAt(buf, 0)
		c.Close()
		if err != nil {
			return fmt.Errorf("self-check of export %q: read: %w", name, err)
		}
	}
	return nil
}

// Shutdown stops serving gracefully: no new connection or request is taken, the
// requests in flight are answered (until ctx ends: then connections are closed), the
// drives are flushed and closed.
func (n *Node) Shutdown(ctx context.Context) error {
	n.emit(Event{Type: EventNodeStopping, Message: "the node stops serving its volumes"})
	n.mu.Lock()
	srv := n.srv
	n.mu.Unlock()
	var err error
	if srv != nil {
		err = srv.Shutdown(ctx)
	}
	return errors.Join(err, n.Close())
}

// Close stops serving at once (connections closed, requests in flight dropped) and
// closes the drives. A node that never started has nothing to close.
func (n *Node) Close() error {
	n.mu.Lock()
	srv, vols := n.srv, n.volumes
	n.closed, n.volumes = true, map[string]*vol{}
	n.mu.Unlock()
	var errs []error
	if srv != nil {
		srv.Close()
	}
	for _, v := range vols {
		if err := v.drive.Device.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", v.drive.Path, err))
		}
	}
	return errors.Join(errs...)
}
