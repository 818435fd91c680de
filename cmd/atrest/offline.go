package main

// A stand-in for package node until the commands are rewired onto it: the keystore
// (custody), the registry (the drives) and package drive, put together as the commands
// did when keystore held all three, with the same output. Everything here moves into
// the node.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/node"
	"github.com/atrest/atrest/registry"
)

// openOffline opens the keystore read-only and the registry of its drives: registry.json
// beside a keystore.json of version 2 (an empty one before the first drive), or the one a
// keystore.json of version 1 describes (registry.json is then ignored: a migration that
// crashed may have left one, which the next migration derives again).
func openOffline(ctx context.Context, dir string) (*keystore.Keystore, *registry.Registry, error) {
	k, err := keystore.Open(dir)
	if err != nil {
		return nil, nil, err
	}
	if k.V1() {
		r, err := k.LegacyRegistry()
		return k, r, err
	}
	s := registry.NewFileStore(dir)
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

// lockOffline takes the custody lock and migrates a keystore.json of version 1 (under
// the registry lock, which it releases again).
func lockOffline(ctx context.Context, dir string) (*keystore.Locked, error) {
	l, err := keystore.Lock(dir)
	if err != nil {
		return nil, err
	}
	if l.V1() {
		tx, err := registry.NewFileStore(dir).Begin(ctx)
		if err == nil {
			err = l.MigrateV1(tx)
			tx.Close()
		}
		if err != nil {
			l.Close()
			return nil, err
		}
	}
	return l, nil
}

// beginRegistry takes the registry lock of a migrated keystore (custody lock held: the
// order is custody, then registry).
func beginRegistry(ctx context.Context, l *keystore.Locked) (*registry.Tx, error) {
	s := registry.NewFileStore(l.Dir())
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

// recordRotation is the Finish of a rotation: the registry records its outcome.
func recordRotation(ctx context.Context, l *keystore.Locked, out keystore.RotateOutcome) error {
	tx, err := beginRegistry(ctx, l)
	if err != nil {
		return err
	}
	defer tx.Close()
	if err := out.Record(tx.Registry()); err != nil {
		return err
	}
	return tx.Commit()
}

// Drive states as `encryption-status` and `drive list` printed them before the node.
const (
	statePresent   = drive.StatePresent
	stateAbsent    = "absent"  // not at its path
	stateMissing   = "missing" // at its path, but it does not answer (drive.StateFailed)
	stateOldKey    = keystore.LegacyOldKey
	stateRotating  = "rotating"
	stateDegraded  = drive.StateDegraded
	stateDamaged   = drive.StateDamaged
	stateNotMember = "not-a-member"
)

// legacyDrives is the registry in the shape `drive list --json` printed.
func legacyDrives(r *registry.Registry) []keystore.LegacyDrive {
	out := []keystore.LegacyDrive{}
	for _, d := range r.Drives {
		ld := keystore.LegacyDrive{UUID: d.UUID, VolumeUUID: d.VolumeUUID, MemberIndex: d.MemberIndex, MemberCount: 1,
			KeyID: d.KeyID, Path: d.Path, SectorSize: d.SectorSize, State: keystore.LegacyActive, Added: d.Added}
		if v := r.VolumeByUUID(d.VolumeUUID); v != nil {
			ld.Volume, ld.MemberCount = v.Name, len(v.Members)
		}
		if d.State != registry.DriveActive {
			ld.State = stateOldKey
		}
		out = append(out, ld)
	}
	return out
}

// cliStatus is what `atrest encryption-status --json` prints (schema in
// docs/luks2-profile.md).
type cliStatus struct {
	DataEncrypted    bool                 `json:"data_encrypted"`
	Type             string               `json:"type"`
	Cipher           string               `json:"cipher"`
	ClusterUUID      string               `json:"cluster_uuid"`
	Keystore         string               `json:"keystore"`
	MasterKeyID      string               `json:"master_key_id"`
	MasterKeyCreated time.Time            `json:"master_key_created"`
	MasterKeyAge     int64                `json:"master_key_age_seconds"`
	LastRotation     *time.Time           `json:"last_key_rotation"`
	RotationUnderWay bool                 `json:"rotation_in_progress"`
	Rotation         *node.RotationStatus `json:"rotation"`
	Drives           []driveStatus        `json:"drives"`
}

type driveStatus struct {
	UUID        string `json:"uuid"`
	Volume      string `json:"volume"`
	MemberIndex int    `json:"member_index"`
	MemberCount int    `json:"member_count"`
	Path        string `json:"path"`
	State       string `json:"state"`
	KeyID       string `json:"key_id"`
	SectorSize  int    `json:"sector_size"`
	Detail      string `json:"detail,omitempty"`
}

// servable reports whether `atrest serve` opens a drive in this state: present,
// rotating, or with one header copy damaged.
func (d driveStatus) servable() bool {
	return d.State == statePresent || d.State == stateRotating || d.State == stateDegraded
}

// offlineStatus reads the custody state and checks every drive (drive.Check: present,
// and opened by a key the keystore gives). It writes nothing and takes no lock.
func offlineStatus(k *keystore.Keystore, r *registry.Registry) (*cliStatus, error) {
	s := k.State()
	now := time.Now()
	st := &cliStatus{
		DataEncrypted: true, Type: "software", Cipher: "AES-256-XTS",
		ClusterUUID: s.ClusterUUID, Keystore: k.Dir(),
		MasterKeyID: s.MasterKey.ID, MasterKeyCreated: s.MasterKey.Created,
		MasterKeyAge: int64(now.Sub(s.MasterKey.Created) / time.Second),
		LastRotation: s.LastRotation, RotationUnderWay: s.Rotation != nil,
		Drives: []driveStatus{},
	}
	journal := map[string]string{}
	if j := s.Rotation; j != nil {
		st.Rotation = &node.RotationStatus{Started: j.Started, OldKeyID: j.OldKeyID, NewKeyID: j.NewKey.ID, Phase: j.Phase}
		for _, rd := range j.Drives {
			journal[rd.UUID] = rd.State
			if rd.State == keystore.RotDone || rd.State == keystore.RotAbsent {
				st.Rotation.DrivesDone++
			} else {
				st.Rotation.DrivesLeft++
			}
		}
	}
	for _, d := range legacyDrives(r) {
		ds := driveStatus{
			UUID: d.UUID, Volume: d.Volume, MemberIndex: d.MemberIndex, MemberCount: d.MemberCount,
			Path: d.Path, KeyID: d.KeyID, SectorSize: d.SectorSize, State: d.State,
		}
		if d.State == keystore.LegacyActive {
			h, err := drive.Check(d.Path, drive.UnlockOptions{ClusterUUID: s.ClusterUUID, UUID: d.UUID, Keys: k.Keys})
			if err != nil {
				return nil, err
			}
			ds.State, ds.Detail = h.State, h.Detail
			if h.KeyID != "" {
				ds.KeyID = h.KeyID
			}
			switch h.State {
			case drive.StateMissing:
				ds.State = stateAbsent
			case drive.StateFailed:
				ds.State = stateMissing
			case drive.StateForeign:
				ds.State = stateNotMember
			case drive.StateDegraded:
				ds.Detail += " (the next rotation, or any change, repairs it)"
			}
			if js, ok := journal[d.UUID]; ok && js != keystore.RotDone && ds.State == statePresent {
				ds.State, ds.Detail = stateRotating, "rotation step: "+js
			}
		}
		st.Drives = append(st.Drives, ds)
	}
	return st, nil
}

// formatRequest is a format or an adoption as the node will take it.
type formatRequest struct {
	path, volume  string
	sectorSize    int
	allowDiscards bool
	wipe          func(*blockcrypt.Device) error
	// Adoption: the key that opens the drive now.
	adoptKey       []byte
	keepOldKeyslot bool
}

// formatOffline formats (or adopts) the drive at req.path under both locks and records
// it in the registry: a new volume of layout single, or, for a registered drive
// reformatted, the replacement of that member (its volume renamed if another name is
// given).
func formatOffline(ctx context.Context, l *keystore.Locked, req formatRequest) (keystore.LegacyDrive, *drive.Adopted, error) {
	var none keystore.LegacyDrive
	key, err := l.MasterKey()
	if err != nil {
		return none, nil, err
	}
	defer clear(key.Key)
	tx, err := beginRegistry(ctx, l)
	if err != nil {
		return none, nil, err
	}
	defer tx.Close()
	r := tx.Registry()
	dev, err := drive.Open(req.path, drive.OpenOptions{Exclusive: true})
	if err != nil {
		return none, nil, err
	}
	defer dev.Close()
	in, inspectErr := drive.Inspect(dev, req.path)
	var old *registry.Drive
	if inspectErr == nil {
		old = r.Drive(in.UUID)
	}
	token := luks2.AtrestToken{ClusterUUID: l.ClusterUUID(), Volume: req.volume, MemberCount: 1}
	if old != nil {
		v := r.VolumeByUUID(old.VolumeUUID)
		if req.adoptKey != nil {
			return none, nil, fmt.Errorf("%s: drive %s is already registered (volume %s): %w", req.path, old.UUID, v.Name, registry.ErrExists)
		}
		if token.Volume == "" {
			token.Volume = v.Name
		} else if token.Volume != v.Name {
			if _, err := r.NewVolumeName(token.Volume); err != nil {
				return none, nil, err
			}
		}
		token.VolumeUUID, token.MemberIndex, token.MemberCount = v.UUID, old.MemberIndex, len(v.Members)
	} else {
		if token.Volume, err = r.NewVolumeName(token.Volume); err != nil {
			return none, nil, err
		}
		token.VolumeUUID = uuid.NewString()
	}
	var adopted *drive.Adopted
	if req.adoptKey != nil {
		adopted, err = drive.Adopt(dev, req.path, drive.AdoptOptions{OldKey: req.adoptKey, Key: key, Token: token, KeepOldKeyslot: req.keepOldKeyslot})
		if adopted != nil {
			in = &adopted.Info
		}
	} else {
		in, err = drive.Format(dev, req.path, drive.FormatOptions{Key: key, Token: token, SectorSize: req.sectorSize, AllowDiscards: req.allowDiscards, Wipe: req.wipe})
	}
	if err != nil {
		return none, nil, err
	}
	now := time.Now().UTC().Truncate(time.Second)
	d := registry.Drive{UUID: in.UUID, KeyID: key.ID, Path: req.path, SectorSize: in.SectorSize, State: registry.DriveActive, Added: now}
	if old != nil {
		if err := r.ReplaceMember(old.UUID, d); err != nil {
			return none, nil, err
		}
		r.VolumeByUUID(token.VolumeUUID).Name = token.Volume
	} else if err := r.AddVolume(registry.Volume{UUID: token.VolumeUUID, Name: token.Volume, Layout: registry.LayoutSingle, Created: now}, []registry.Drive{d}); err != nil {
		return none, nil, err
	}
	if err := tx.Commit(); err != nil {
		return none, nil, err
	}
	for _, ld := range legacyDrives(r) {
		if ld.UUID == d.UUID {
			return ld, adopted, nil
		}
	}
	panic("BUG: formatOffline: the drive registered is not in the registry")
}
