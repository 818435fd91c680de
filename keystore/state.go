package keystore

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"time"

	"github.com/google/uuid"

	"github.com/atrest/atrest/drive"
)

// FormatName and FormatVersion identify keystore.json; a file of another name or
// version is refused, never rewritten. FormatVersion1 (which also held the drives) is
// read, and migrated by the first change (Locked.MigrateV1).
const (
	FormatName     = "atrest-keystore"
	FormatVersion  = 2
	FormatVersion1 = 1
)

// State is the content of keystore.json: the key custody (schema in
// docs/luks2-profile.md). Version is FormatVersion, or FormatVersion1 for a file not yet
// migrated.
type State struct {
	Format       string     `json:"format"`
	Version      int        `json:"version"`
	ClusterUUID  string     `json:"cluster_uuid"`
	Created      time.Time  `json:"created"`
	MasterKey    KeyInfo    `json:"master_key"`
	LastRotation *time.Time `json:"last_rotation"`
	// Rotation is the journal of the rotation under way, nil when none is.
	Rotation *Rotation `json:"rotation"`
}

// KeyInfo names a master key.
type KeyInfo struct {
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
}

// Rotation phases.
const (
	// PhaseDrives: master.key.next holds the new key; drives are being rewrapped.
	PhaseDrives = "drives"
	// PhaseCommit: every present drive opens with the new key; master.key is being
	// replaced.
	PhaseCommit = "commit"
)

// Per-drive rotation states, in order: the rewrap phases of package drive, and absent.
const (
	RotPending = drive.PhasePending
	RotAdding  = drive.PhaseAdding
	RotWiping  = drive.PhaseWiping
	RotDone    = drive.PhaseDone
	RotAbsent  = "absent" // missing under Force: stays locked to the old key
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

var keyIDPattern = regexp.MustCompile(`^mk-[0-9a-f]{16}$`)

// maxStateSize bounds keystore.json.
const maxStateSize = 16 << 20

// ParseState decodes and validates keystore.json of either version. For version 1 it
// also returns the drives that version kept (non-nil, maybe empty); for version 2 drives
// is nil. Unknown fields, another format or version, trailing data and inconsistencies
// are errors wrapping ErrCorrupt.
func ParseState(b []byte) (s *State, drives []LegacyDrive, err error) {
	var probe struct {
		Format  string `json:"format"`
		Version int    `json:"version"`
	}
	if err := json.Unmarshal(b, &probe); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if probe.Format != FormatName {
		return nil, nil, fmt.Errorf("%w: format %q is not %q", ErrCorrupt, probe.Format, FormatName)
	}
	switch probe.Version {
	case FormatVersion:
		s = new(State)
		err = decodeStrict(b, s)
	case FormatVersion1:
		var v1 stateV1
		if err = decodeStrict(b, &v1); err == nil {
			s, drives = &v1.State, v1.Drives
			if drives == nil {
				err = errors.New("drives is missing")
			} else {
				err = validateV1(s, drives)
			}
		}
	default:
		return nil, nil, fmt.Errorf("%w: version %d (this atrest reads versions %d and %d; a newer atrest wrote it?)",
			ErrCorrupt, probe.Version, FormatVersion1, FormatVersion)
	}
	if err == nil {
		err = s.validate()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return s, drives, nil
}

// decodeStrict decodes one JSON object without unknown fields or trailing data.
func decodeStrict(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return err
	}
	if _, err := d.Token(); err != io.EOF {
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

func validUUID(s string) bool {
	_, err := uuid.Parse(s)
	return err == nil && len(s) == 36
}

// validate checks the custody state (either version; version 1's drives are checked by
// validateV1).
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
	r := s.Rotation
	if r == nil {
		return nil
	}
	if r.OldKeyID != s.MasterKey.ID {
		return fmt.Errorf("rotation.old_key_id %s is not the master key %s", r.OldKeyID, s.MasterKey.ID)
	}
	if !keyIDPattern.MatchString(r.NewKey.ID) || r.NewKey.ID == r.OldKeyID {
		return fmt.Errorf("rotation.new_key.id %q", r.NewKey.ID)
	}
	if r.Phase != PhaseDrives && r.Phase != PhaseCommit {
		return fmt.Errorf("rotation.phase %q", r.Phase)
	}
	if r.Drives == nil {
		return errors.New("rotation.drives is missing")
	}
	inJournal := map[string]bool{}
	for i, d := range r.Drives {
		if !validUUID(d.UUID) || inJournal[d.UUID] {
			return fmt.Errorf("rotation.drives[%d] names drive %q, not a UUID or twice", i, d.UUID)
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
	return nil
}

// Marshal encodes the state as keystore.json of FormatVersion (indented,
// newline-terminated). It panics on an invalid state or another version: writers
// validate before they get here, and version 1 is never written.
func (s *State) Marshal() []byte {
	if s.Format != FormatName || s.Version != FormatVersion {
		panic(fmt.Sprintf("BUG: keystore: writing format %q version %d", s.Format, s.Version))
	}
	if err := s.validate(); err != nil {
		panic("BUG: keystore: writing an invalid state: " + err.Error())
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		panic("BUG: keystore: state does not marshal: " + err.Error())
	}
	return append(b, '\n')
}

// clone returns a deep copy.
func (s *State) clone() *State {
	c := *s
	if s.LastRotation != nil {
		t := *s.LastRotation
		c.LastRotation = &t
	}
	if s.Rotation != nil {
		r := *s.Rotation
		r.Drives = append([]RotationDrive{}, r.Drives...)
		c.Rotation = &r
	}
	return &c
}
