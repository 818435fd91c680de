package node

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// removeDrain bounds how long the clients of a volume removed with Force get to have
// their requests in flight answered before their connections are closed.
const removeDrain = 10 * time.Second

// RemoveVolume stops serving the volume (when the node serves it) and removes it and
// its member drives from the registry, under both locks (so never in the middle of a
// rotation). The drives keep their headers and data: master.key still opens them
// (cryptsetup), and `atrest drive adopt --key-file master.key` brings one back. A served
// volume with client connections is refused unless Force; with Force its clients'
// requests in flight are answered, then their connections closed.
func (n *Node) RemoveVolume(ctx context.Context, req RemoveVolumeRequest) (*VolumeStatus, error) {
	if !ValidVolumeName(req.Name) {
		return nil, fmt.Errorf("volume name %q: %w", req.Name, ErrInvalid)
	}
	l, err := n.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	tx, err := n.begin(ctx, l)
	if err != nil {
		return nil, err
	}
	defer tx.Close()
	r := tx.Registry()
	v := r.Volume(req.Name)
	if v == nil {
		return nil, fmt.Errorf("volume %q: %w", req.Name, ErrNotFound)
	}
	before, err := n.Volume(ctx, req.Name)
	if err != nil {
		return nil, err
	}
	if err := n.unserve(ctx, v.UUID, req.Force); err != nil {
		return nil, err
	}
	if err := r.RemoveVolume(v.UUID); err != nil {
		return nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	n.emit(Event{Type: EventVolumeRemoved, Volume: req.Name, Message: fmt.Sprintf("volume %s removed from the node (its drives keep their data)", req.Name)})
	return before, nil
}

// unserve stops serving a volume: its exports are removed (refused while clients are
// connected, unless force) and its drive closed. A volume not served is left alone.
func (n *Node) unserve(ctx context.Context, id string, force bool) error {
	n.mu.Lock()
	v := n.volumes[id]
	srv := n.srv
	if v == nil || srv == nil {
		n.mu.Unlock()
		return nil
	}
	conns := 0
	for _, e := range v.exports {
		conns += srv.Connections(e)
	}
	if conns > 0 && !force {
		n.mu.Unlock()
		return fmt.Errorf("volume %s has %d client connection(s): unmount it first, or force (its clients lose the volume): %w", v.name, conns, ErrConflict)
	}
	delete(n.volumes, id)
	n.mu.Unlock()
	dctx, cancel := context.WithTimeout(ctx, removeDrain)
	defer cancel()
	var errs []error
	for _, e := range v.exports {
		if err := srv.RemoveExport(dctx, e); err != nil {
			errs = append(errs, err)
		}
	}
	if err := v.drive.Device.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close %s: %w", v.drive.Path, err))
	}
	return errors.Join(errs...)
}
