package node

import (
	"context"
	"fmt"

	"github.com/atrest/atrest/keystore"
)

// Rotate replaces the master key and rewraps the data key of every active drive (see
// keystore.Locked.Rotate), resuming a rotation the journal records. It runs under the
// custody lock: one at a time, here (ErrRotationRunning) and across processes (the
// lock is busy). The outcome is recorded in the registry before the journal is
// cleared. Served volumes stay online: data keys do not change.
//
// RotateRequest.Step, set in-process, is called after every step (progress, crash
// tests); every step is also an event.
func (n *Node) Rotate(ctx context.Context, req RotateRequest) (*RotateResult, error) {
	if !n.rotating.TryLock() {
		return nil, fmt.Errorf("%w in this daemon", ErrRotationRunning)
	}
	defer n.rotating.Unlock()
	l, err := n.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	tx, err := n.begin(ctx, l)
	if err != nil {
		return nil, err
	}
	drives := keystore.RotateDrives(tx.Registry())
	// The registry's lock is not held while the drives are rewrapped: the custody lock
	// keeps every change that needs the master key out, and Finish takes it again.
	tx.Close()

	old := l.State().MasterKey.ID
	n.emit(Event{Type: EventRotationStarted, Data: old, Message: fmt.Sprintf("key rotation of %d drive(s) started (master key %s)", len(drives), old)})
	out, err := l.Rotate(ctx, keystore.RotateOptions{
		Drives: drives,
		Force:  req.Force,
		Step: func(s keystore.Step) {
			e := Event{Type: EventRotationStep, Data: s.Name, Message: "key rotation: " + s.Name}
			if s.Drive != nil {
				e.Drive, e.Volume, e.Path = s.Drive.UUID, s.Drive.Volume, s.Drive.Path
				e.Message = fmt.Sprintf("key rotation: drive %d/%d (%s, volume %s): %s", s.Index, s.Total, s.Drive.UUID, s.Drive.Volume, s.Name)
			}
			n.emit(e)
			if req.Step != nil {
				req.Step(s)
			}
		},
		Finish: func(out keystore.RotateOutcome) error {
			tx, err := n.begin(ctx, l)
			if err != nil {
				return err
			}
			defer tx.Close()
			if err := out.Record(tx.Registry()); err != nil {
				return err
			}
			return tx.Commit()
		},
	})
	if err != nil {
		n.emit(Event{Type: EventRotationFailed, Message: "key rotation failed: " + err.Error()})
		return nil, err
	}
	res := &RotateResult{MasterKeyID: out.NewKeyID, LastKeyRotationTime: out.Time, Resumed: out.Resumed, StaleDrives: []DriveStatus{}}
	_, r, err := n.snapshot(ctx)
	if err != nil {
		return nil, err
	}
	for _, id := range out.Stale {
		d := r.Drive(id)
		if d == nil {
			continue
		}
		ds := DriveStatus{UUID: d.UUID, VolumeUUID: d.VolumeUUID, Path: d.Path, State: DriveStale, KeyID: d.KeyID, SectorSize: d.SectorSize, Added: d.Added}
		if v := r.VolumeByUUID(d.VolumeUUID); v != nil {
			ds.Volume = v.Name
		}
		res.StaleDrives = append(res.StaleDrives, ds)
	}
	n.emit(Event{Type: EventRotationFinished, Data: out.NewKeyID, Message: fmt.Sprintf("key rotation complete: master key %s (was %s)", out.NewKeyID, out.OldKeyID)})
	return res, nil
}
