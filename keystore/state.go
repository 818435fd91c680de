package keystore

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
	"time"

	"github.com/google/uuid"
)

// FormatName and FormatVersion identify keystore.json; a file of another name or
// version is refused, never rewritten.
const (
	FormatName    = "atrest-keystore"
	FormatVersion = 1
)

// State is the content of keystore.json (schema in docs/luks2-profile.md).
type State struct {
	Format       string     `json:"format"`
	Version      int        `json:"version"`
	ClusterUUID  string     `json:"cluster_uuid"`
	Created      time.Time  `json:"created"`
	MasterKey    KeyInfo    `json:"master_key"`
	LastRotation *time.Time `json:"last_rotation"`
	// Rotation is the journal of the rotation under way, nil when none is.
	Rotation *Rotation `json:"rotation"`
	Drives   []Drive   `json:"drives"`
}

// KeyInfo names a master key.
type KeyInfo struct {
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
}

// Drive states in the registry.
const (
	// DriveActive: a member in service, wrapped by the current master key.
	DriveActive = "active"
	// DriveRetired: absent at a forced rotation and locked to an old master key for
	// good; it can only come back as a new member (format or adopt).
	DriveRetired = "locked-to-old-key"
)

// Drive is a drive of the cluster.
type Drive struct {
	UUID        string    `json:"uuid"` // the LUKS2 header's UUID
	Volume      string    `json:"volume"`
	VolumeUUID  string    `json:"volume_uuid"`
	MemberIndex int       `json:"member_index"`
	MemberCount int       `json:"member_count"`
	KeyID       string    `json:"key_id"` // master key that wraps its keyslot
	Path        string    `json:"path"`   // last known path, absolute
	SectorSize  int       `json:"sector_size"`
	State       string    `json:"state"`
	Added       time.Time `json:"added"`
}

// Rotation phases.
const (
	// PhaseDrives: master.key.next holds the new key; drives are being rewrapped.
	PhaseDrives = "drives"
	// PhaseCommit: every present drive opens with the new key; master.key is being
	// replaced.
	PhaseCommit = "commit"
)

// Per-drive rotation states, in order.
const (
	RotPending = "pending" // untouched: the old key opens it
	RotAdding  = "adding"  // old_slot known; the new slot may or may not be written
	RotWiping  = "wiping"  // new_slot verified; the old slot may or may not be wiped
	RotDone    = "done"    // only the new key opens it; token updated
	RotAbsent  = "absent"  // absent under --force: stays locked to the old key
)

// Rotation is the rotation journal.
type Rotation struct {
	Started  time.Time       `json:"started"`
	OldKeyID string          `json:"old_key_id"`
	NewKey   KeyInfo         `json:"new_key"`
	Phase    string          `json:"phase"`
	Drives   []RotationDrive `json:"drives"`
}

// RotationDrive is one drive's progress in the journal.
type RotationDrive struct {
	UUID    string `json:"uuid"`
	State   string `json:"state"`
	OldSlot int    `json:"old_slot"` // -1 until known
	NewSlot int    `json:"new_slot"` // -1 until known
}

var (
	keyIDPattern  = regexp.MustCompile(`^mk-[0-9a-f]{16}$`)
	volumePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
)

// ValidVolumeName reports whether name can name a volume (it becomes an NBD export
// name): 1 to 64 letters, digits, '.', '_' or '-', not starting with a punctuation.
func ValidVolumeName(name string) bool { return volumePattern.MatchString(name) }

// maxStateSize bounds keystore.json.
const maxStateSize = 16 << 20

// ParseState decodes and validates keystore.json. Unknown fields, another format
// or version, trailing data and inconsistencies are errors wrapping ErrCorrupt.
func ParseState(b []byte) (*State, error) {
	var probe struct {
		Format  string `json:"format"`
		Version int    `json:"version"`
	}
	if err := json.Unmarshal(b, &probe); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if probe.Format != FormatName {
		return nil, fmt.Errorf("%w: format %q is not %q", ErrCorrupt, probe.Format, FormatName)
	}
	if probe.Version != FormatVersion {
		return nil, fmt.Errorf("%w: version %d (this atrest reads version %d; a newer atrest wrote it?)", ErrCorrupt, probe.Version, FormatVersion)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	var s State
	if err := d.Decode(&s); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if _, err := d.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: trailing data after the JSON object", ErrCorrupt)
	}
	if err := s.validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return &s, nil
}

func validUUID(s string) bool {
	_, err := uuid.Parse(s)
	return err == nil && len(s) == 36
}

func (s *State) validate() error {
	if !validUUID(s.ClusterUUID) {
		return fmt.Errorf("cluster_uuid %q is not a UUID", s.ClusterUUID)
	}
	if !keyIDPattern.MatchString(s.MasterKey.ID) {
		return fmt.Errorf("master_key.id %q is not a key id", s.MasterKey.ID)
	}
	if s.Created.IsZero() || s.MasterKey.Created.IsZero() {
		return errors.New("a creation time is missing")
	}
	if s.Drives == nil {
		return errors.New("drives is missing")
	}
	seen := map[string]bool{}
	for i, d := range s.Drives {
		switch {
		case !validUUID(d.UUID):
			return fmt.Errorf("drives[%d].uuid %q is not a UUID", i, d.UUID)
		case seen[d.UUID]:
			return fmt.Errorf("drive %s is listed twice", d.UUID)
		case !ValidVolumeName(d.Volume):
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
		case d.State != DriveActive && d.State != DriveRetired:
			return fmt.Errorf("drives[%d].state %q", i, d.State)
		}
		seen[d.UUID] = true
	}
	if r := s.Rotation; r != nil {
		if r.OldKeyID != s.MasterKey.ID {
			return fmt.Errorf("rotation.old_key_id %s is not the master key %s", r.OldKeyID, s.MasterKey.ID)
		}
		if !keyIDPattern.MatchString(r.NewKey.ID) || r.NewKey.ID == r.OldKeyID {
			return fmt.Errorf("rotation.new_key.id %q", r.NewKey.ID)
		}
		if r.Phase != PhaseDrives && r.Phase != PhaseCommit {
			return fmt.Errorf("rotation.phase %q", r.Phase)
		}
		inJournal := map[string]bool{}
		for i, d := range r.Drives {
			if !seen[d.UUID] || inJournal[d.UUID] {
				return fmt.Errorf("rotation.drives[%d] names drive %q, unknown or twice", i, d.UUID)
			}
			inJournal[d.UUID] = true
			switch d.State {
			case RotPending, RotAdding, RotWiping, RotDone, RotAbsent:
			default:
				return fmt.Errorf("rotation.drives[%d].state %q", i, d.State)
			}
			if d.OldSlot < -1 || d.OldSlot > 31 || d.NewSlot < -1 || d.NewSlot > 31 {
				return fmt.Errorf("rotation.drives[%d] keyslots %d, %d", i, d.OldSlot, d.NewSlot)
			}
			if r.Phase == PhaseCommit && d.State != RotDone && d.State != RotAbsent {
				return fmt.Errorf("rotation in phase commit with drive %s %s", d.UUID, d.State)
			}
		}
	}
	return nil
}

// Marshal encodes the state as keystore.json (indented, newline-terminated).
func (s *State) Marshal() []byte {
	if err := s.validate(); err != nil {
		panic("BUG: keystore: writing an invalid state: " + err.Error())
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		panic("BUG: keystore: state does not marshal: " + err.Error())
	}
	return append(b, '\n')
}

// drive returns the registry entry of a drive, or nil.
func (s *State) drive(uuid string) *Drive {
	for i := range s.Drives {
		if s.Drives[i].UUID == uuid {
			return &s.Drives[i]
		}
	}
	return nil
}
