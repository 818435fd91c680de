package keystore

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/atrest/atrest/internal/securefile"
	"github.com/atrest/atrest/registry"
)

// keystore.json version 1 held the drives too; version 2 leaves them to the registry
// (registry.json). A version 1 file opens read-only as the custody State plus its drive
// list, and the first change migrates it (MigrateV1): registry.json first, derived from
// the drive list, then keystore.json version 2, each written atomically. A crash between
// the two leaves keystore.json version 1 authoritative and registry.json derived from it
// again by the next migration, so nothing reads a registry.json that a version 1
// keystore.json sits beside.

// Drive states of version 1.
const (
	// LegacyActive: a member in service.
	LegacyActive = "active"
	// LegacyOldKey: missing at a forced rotation, locked to an old master key for good
	// (registry.DriveStale).
	LegacyOldKey = "locked-to-old-key"
)

// LegacyDrive is a drive as keystore.json version 1 recorded it.
type LegacyDrive struct {
	UUID        string    `json:"uuid"` // the LUKS2 header's UUID
	Volume      string    `json:"volume"`
	VolumeUUID  string    `json:"volume_uuid"`
	MemberIndex int       `json:"member_index"`
	MemberCount int       `json:"member_count"`
	KeyID       string    `json:"key_id"` // master key that wraps its keyslot
	Path        string    `json:"path"`   // last known path
	SectorSize  int       `json:"sector_size"`
	State       string    `json:"state"`
	Added       time.Time `json:"added"`
}

// stateV1 is keystore.json version 1: the custody fields, then the drives.
type stateV1 struct {
	State
	Drives []LegacyDrive `json:"drives"`
}

// validateV1 checks version 1's drives, and that its journal names only them.
func validateV1(s *State, drives []LegacyDrive) error {
	seen := map[string]bool{}
	for i, d := range drives {
		switch {
		case !validUUID(d.UUID):
			return fmt.Errorf("drives[%d].uuid %q is not a UUID", i, d.UUID)
		case seen[d.UUID]:
			return fmt.Errorf("drive %s is listed twice", d.UUID)
		case !registry.ValidVolumeName(d.Volume):
			return fmt.Errorf("drives[%d].volume %q is not a volume name", i, d.Volume)
		case !validUUID(d.VolumeUUID):
			return fmt.Errorf("drives[%d].volume_uuid %q is not a UUID", i, d.VolumeUUID)
		case d.MemberCount < 1 || d.MemberIndex < 0 || d.MemberIndex >= d.MemberCount:
			return fmt.Errorf("drives[%d] is member %d of %d", i, d.MemberIndex, d.MemberCount)
		case !keyIDPattern.MatchString(d.KeyID):
			return fmt.Errorf("drives[%d].key_id %q is not a key id", i, d.KeyID)
		case !filepath.IsAbs(d.Path):
			// A relative path would name another file in every working directory.
			return fmt.Errorf("drives[%d].path %q is not an absolute path", i, d.Path)
		case d.SectorSize != 512 && d.SectorSize != 4096:
			return fmt.Errorf("drives[%d].sector_size %d", i, d.SectorSize)
		case d.State != LegacyActive && d.State != LegacyOldKey:
			return fmt.Errorf("drives[%d].state %q", i, d.State)
		}
		seen[d.UUID] = true
	}
	if s.Rotation != nil {
		for i, d := range s.Rotation.Drives {
			if !seen[d.UUID] {
				return fmt.Errorf("rotation.drives[%d] names drive %q, which is not listed", i, d.UUID)
			}
		}
	}
	return nil
}

// V1 reports whether keystore.json is version 1, not migrated yet: its drives are then
// LegacyDrives (and LegacyRegistry), not the registry's.
func (k *Keystore) V1() bool { return k.state.Version == FormatVersion1 }

// LegacyDrives returns the drives of a keystore.json version 1, nil for version 2.
func (k *Keystore) LegacyDrives() []LegacyDrive {
	if !k.V1() {
		return nil
	}
	return append([]LegacyDrive{}, k.legacy...)
}

// LegacyRegistry returns the registry a keystore.json version 1 describes, which its
// migration writes: each drive the only member of a volume of layout single (the
// volume's UUID and name as recorded, generation 1, created when the drive was added),
// locked-to-old-key drives stale, never seen since. For version 2 it returns nil. A
// drive list that does not make a valid registry (a relative path, a volume name used
// twice) is an error wrapping ErrCorrupt.
func (k *Keystore) LegacyRegistry() (*registry.Registry, error) {
	if !k.V1() {
		return nil, nil
	}
	r := registry.New(k.state.ClusterUUID)
	for _, d := range k.legacy {
		if d.MemberCount != 1 {
			return nil, fmt.Errorf("%s version 1: drive %s is member %d of %d, which only a mirror could be: %w",
				StateFile, d.UUID, d.MemberIndex, d.MemberCount, ErrCorrupt)
		}
		state := registry.DriveActive
		if d.State == LegacyOldKey {
			state = registry.DriveStale
		}
		v := registry.Volume{UUID: d.VolumeUUID, Name: d.Volume, Layout: registry.LayoutSingle, Created: d.Added}
		m := registry.Drive{UUID: d.UUID, KeyID: d.KeyID, Path: d.Path, SectorSize: d.SectorSize, State: state, Added: d.Added}
		if err := r.AddVolume(v, []registry.Drive{m}); err != nil {
			return nil, fmt.Errorf("%s version 1 does not make a registry: %w: %w", StateFile, ErrCorrupt, err)
		}
	}
	return r, nil
}

// MigrateV1 migrates a keystore.json of version 1 (and does nothing to one of version
// 2): it replaces the registry of tx with LegacyRegistry and commits it, then writes
// keystore.json version 2, the same custody state without the drives. Holding both
// handles proves both locks are held (custody, then registry). Call it first thing
// after taking them, before any other change to tx: it discards them. A crash in
// between leaves version 1 authoritative; the next migration derives the registry
// again.
func (l *Locked) MigrateV1(tx *registry.Tx) error {
	if l.lockF == nil {
		return errClosed
	}
	if !l.V1() {
		return nil
	}
	reg, err := l.LegacyRegistry()
	if err != nil {
		return err
	}
	tx.Reset(reg)
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("migrate %s version 1: write the registry: %w", StateFile, err)
	}
	s := l.state.clone()
	s.Version = FormatVersion
	if err := securefile.WriteAtomic(l.dir, StateFile, s.Marshal()); err != nil {
		return fmt.Errorf("migrate %s version 1: %w", StateFile, err)
	}
	l.state, l.legacy = s, nil
	return nil
}
