package keystore

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/atrest/atrest/luks2"
)

// Drive states in a Status.
const (
	StatePresent   = "present"         // at its path; the master key opens it
	StateAbsent    = "absent"          // not at its last known path
	StateMissing   = "missing"         // at its path, but it cannot be read (I/O errors)
	StateOldKey    = DriveRetired      // left to an old key by a forced rotation
	StateRotating  = "rotating"        // a rotation is rewrapping it
	StateWrongKey  = "wrong-key"       // there, but the master key does not open it
	StateDegraded  = "header-degraded" // opens, but one header copy is damaged
	StateDamaged   = "header-damaged"  // header damaged, refused, or larger than the drive
	StateNotMember = "not-a-member"    // a LUKS2 drive without this cluster's token
)

// Status is what `atrest encryption-status --json` prints (schema in
// docs/luks2-profile.md).
type Status struct {
	DataEncrypted    bool            `json:"data_encrypted"`
	Type             string          `json:"type"`
	Cipher           string          `json:"cipher"`
	ClusterUUID      string          `json:"cluster_uuid"`
	Keystore         string          `json:"keystore"`
	MasterKeyID      string          `json:"master_key_id"`
	MasterKeyCreated time.Time       `json:"master_key_created"`
	MasterKeyAge     int64           `json:"master_key_age_seconds"`
	LastRotation     *time.Time      `json:"last_key_rotation"`
	RotationUnderWay bool            `json:"rotation_in_progress"`
	Rotation         *RotationStatus `json:"rotation"`
	Drives           []DriveStatus   `json:"drives"`
}

// RotationStatus summarises the journal.
type RotationStatus struct {
	Started    time.Time `json:"started"`
	OldKeyID   string    `json:"old_key_id"`
	NewKeyID   string    `json:"new_key_id"`
	Phase      string    `json:"phase"`
	DrivesDone int       `json:"drives_done"`
	DrivesLeft int       `json:"drives_left"`
}

// DriveStatus is one drive in a Status.
type DriveStatus struct {
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

// Servable reports whether `atrest serve` opens the drive in this state: present,
// rotating, or with one header copy damaged.
func (d DriveStatus) Servable() bool {
	return d.State == StatePresent || d.State == StateRotating || d.State == StateDegraded
}

// Status reads the state of the cluster and checks every drive as Unlock does: at its
// path, readable, a valid header of this cluster, opened by a key of the keystore (a
// PBKDF2 derivation of 1000 iterations per drive), and a data segment that fits the
// drive. It writes nothing and takes no lock.
func (k *Keystore) Status() (*Status, error) {
	s := k.state
	now := k.now()
	st := &Status{
		DataEncrypted: true, Type: "software", Cipher: "AES-256-XTS",
		ClusterUUID: s.ClusterUUID, Keystore: k.dir,
		MasterKeyID: s.MasterKey.ID, MasterKeyCreated: s.MasterKey.Created,
		MasterKeyAge: int64(now.Sub(s.MasterKey.Created) / time.Second),
		LastRotation: s.LastRotation, RotationUnderWay: s.Rotation != nil,
		Drives: []DriveStatus{},
	}
	journal := map[string]string{}
	if r := s.Rotation; r != nil {
		st.Rotation = &RotationStatus{Started: r.Started, OldKeyID: r.OldKeyID, NewKeyID: r.NewKey.ID, Phase: r.Phase}
		for _, rd := range r.Drives {
			journal[rd.UUID] = rd.State
			if rd.State == RotDone || rd.State == RotAbsent {
				st.Rotation.DrivesDone++
			} else {
				st.Rotation.DrivesLeft++
			}
		}
	}
	keys, err := k.masterKeys()
	if err != nil {
		return nil, err
	}
	defer zeroKeys(keys)
	for _, d := range s.Drives {
		ds := DriveStatus{
			UUID: d.UUID, Volume: d.Volume, MemberIndex: d.MemberIndex, MemberCount: d.MemberCount,
			Path: d.Path, KeyID: d.KeyID, SectorSize: d.SectorSize,
		}
		if d.State == DriveRetired {
			ds.State = StateOldKey
		} else {
			ds.State, ds.KeyID, ds.Detail = k.checkDrive(d, keys)
			if js, ok := journal[d.UUID]; ok && js != RotDone && ds.State == StatePresent {
				ds.State, ds.Detail = StateRotating, "rotation step: "+js
			}
		}
		st.Drives = append(st.Drives, ds)
	}
	return st, nil
}

// checkDrive finds the drive and the key that opens it, with the checks of Unlock.
func (k *Keystore) checkDrive(d Drive, keys []namedKey) (state, keyID, detail string) {
	dev, err := openDriveReadOnly(d.Path)
	if err != nil {
		if isIOError(err) {
			return StateMissing, d.KeyID, err.Error()
		}
		return StateAbsent, d.KeyID, err.Error()
	}
	defer dev.Close()
	h, err := luks2.Load(dev)
	switch {
	case errors.Is(err, luks2.ErrNotLUKS):
		return StateAbsent, d.KeyID, fmt.Sprintf("%s holds no LUKS2 header", d.Path)
	case err != nil:
		return headerState(err), d.KeyID, err.Error()
	case h.UUID() != d.UUID:
		return StateAbsent, d.KeyID, fmt.Sprintf("%s holds drive %s", d.Path, h.UUID())
	}
	tok, err := h.AtrestToken()
	if err != nil || tok == nil || tok.ClusterUUID != k.state.ClusterUUID {
		return StateNotMember, d.KeyID, fmt.Sprintf("no atrest token of cluster %s", k.state.ClusterUUID)
	}
	for _, nk := range keys {
		vk, _, err := h.UnlockAny(dev, atrestSlots(h), nk.key)
		if err != nil {
			if errors.Is(err, luks2.ErrWrongKey) {
				continue
			}
			return headerState(err), d.KeyID, err.Error()
		}
		clear(vk)
		if _, err := dataConfig(h).RegionSize(dev.Size()); err != nil {
			return StateDamaged, nk.id, fmt.Sprintf("data segment: %v", err)
		}
		if bad, why := h.NeedsRepair(); bad {
			return StateDegraded, nk.id, why.Error() + " (the next rotation, or any change, repairs it)"
		}
		return StatePresent, nk.id, ""
	}
	return StateWrongKey, tok.MasterKeyID, "the master key does not open it"
}

// headerState is the state of a drive whose header could not be loaded or used: a
// header or keyslot that is damaged, refused or larger than the drive, or else (the
// drive failed to read) missing.
func headerState(err error) string {
	if errors.Is(err, luks2.ErrDamaged) || errors.Is(err, luks2.ErrUnsupported) || errors.Is(err, luks2.ErrTruncated) {
		return StateDamaged
	}
	return StateMissing
}

// isIOError reports whether opening a drive failed because the device is there but
// does not answer (pulled, powered off, or a loop device without a backing file).
func isIOError(err error) bool {
	return errors.Is(err, syscall.EIO) || errors.Is(err, syscall.ENXIO) || errors.Is(err, syscall.ENODEV) || errors.Is(err, syscall.ENOMEDIUM)
}
