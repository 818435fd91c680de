package node

import (
	"context"
	"errors"
	"time"

	"github.com/atrest/atrest/keystore"
)

// Service is what a node answers, whether the caller holds the Node in its own process
// (the daemon; or a command run while no daemon serves the keystore, which opens an
// offline Node) or talks to the daemon through its control API (package node/api, whose
// Client implements Service too). The CLI prints what either returns, the same way.
//
// Errors match the sentinels of this package (ErrNotFound, ErrConflict, ErrInvalid,
// ErrRotationRunning, ...) and, through the API, keep their class.
type Service interface {
	// Identity says which keystore and cluster the service manages and whether it
	// serves volumes.
	Identity(ctx context.Context) (*Identity, error)
	// EncryptionStatus is the short answer, in the shape of the product atrest is
	// modelled on.
	EncryptionStatus(ctx context.Context) (*EncryptionStatus, error)
	// Status is atrest's full status: keys, rotation, volumes, drives.
	Status(ctx context.Context) (*Status, error)
	// Rotate replaces the master key and rewraps every drive's data key, to the end
	// (it resumes a rotation found in the journal). It fails with ErrRotationRunning
	// while another runs.
	Rotate(ctx context.Context, req RotateRequest) (*RotateResult, error)
	// Drives lists the drives of the registry with what is known of them now.
	Drives(ctx context.Context) ([]DriveStatus, error)
	// Drive finds one drive by UUID, unique UUID prefix (at least 8 characters) or
	// path.
	Drive(ctx context.Context, name string) (*DriveStatus, error)
	// AddDrive formats a drive (or adopts a LUKS2 drive formatted elsewhere) as a new
	// volume, or as the replacement of a stale member. A serving node exports the
	// volume at once.
	AddDrive(ctx context.Context, req AddDriveRequest) (*AddDriveResult, error)
	// Volumes lists the volumes.
	Volumes(ctx context.Context) ([]VolumeStatus, error)
	// Volume returns one volume by name.
	Volume(ctx context.Context, name string) (*VolumeStatus, error)
	// RemoveVolume stops serving a volume and removes it and its drives from the
	// registry; the drives keep their headers and data.
	RemoveVolume(ctx context.Context, req RemoveVolumeRequest) (*VolumeStatus, error)
}

// RemoveVolumeRequest asks to remove a volume from the node.
type RemoveVolumeRequest struct {
	Name string `json:"name"`
	// Force removes a volume that clients are connected to (they lose it); without it
	// such a volume is refused (ErrConflict).
	Force bool `json:"force"`
}

var _ Service = (*Node)(nil)

var (
	// ErrNotFound: no drive or volume answers to the name given.
	ErrNotFound = errors.New("not found")
	// ErrConflict: the request contradicts the node's state (a name taken, a drive in
	// use or already registered, data that would be overwritten without force).
	ErrConflict = errors.New("conflict")
	// ErrInvalid: a malformed request (a bad name, size, path or option).
	ErrInvalid = errors.New("invalid request")
	// ErrRotationRunning: another key rotation is running.
	ErrRotationRunning = errors.New("a key rotation is running")
	// ErrOffline: the operation needs the daemon (which is not running).
	ErrOffline = errors.New("the atrest daemon is not running")
)

// Identity says which keystore and cluster a Service manages.
type Identity struct {
	// Keystore is the keystore directory (absolute).
	Keystore    string `json:"keystore"`
	ClusterUUID string `json:"cluster_uuid"`
	// Hostname is the node's host name.
	Hostname string `json:"hostname"`
	// Serving is true for the daemon (volumes exported), false for an offline Node.
	Serving bool `json:"serving"`
	// PID is the serving process, 0 offline.
	PID int `json:"pid"`
	// Version is atrest's version.
	Version string `json:"version"`
}

// EncryptionStatus is GET /v1/encryption/status: exactly the product's shape, so that
// scripts written for it port.
type EncryptionStatus struct {
	// Status is "Encrypted" (atrest cannot run unencrypted).
	Status string `json:"status"`
	// Type is "Local": the master key is kept on the node's boot drive.
	Type string `json:"type"`
	// LastKeyRotationTime is RFC 3339 UTC, or null before the first rotation.
	LastKeyRotationTime *time.Time `json:"last_key_rotation_time"`
}

// Status is atrest's full status: the schema of `atrest encryption-status --json`
// (documented in docs/status.md), whose field names are kept from wave 1 and extended.
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
	// Serving says whether the daemon answered (presence is then what it sees) or the
	// status was read from the keystore and the drives directly.
	Serving bool           `json:"serving"`
	Volumes []VolumeStatus `json:"volumes"`
	Drives  []DriveStatus  `json:"drives"`
	// Advice lists what the administrator should do, in words (e.g. rotate the master
	// key after a drive was replaced).
	Advice []string `json:"advice"`
}

// RotationStatus summarises a rotation under way.
type RotationStatus struct {
	Started    time.Time `json:"started"`
	OldKeyID   string    `json:"old_key_id"`
	NewKeyID   string    `json:"new_key_id"`
	Phase      string    `json:"phase"`
	DrivesDone int       `json:"drives_done"`
	DrivesLeft int       `json:"drives_left"`
}

// Drive states in a DriveStatus (the words of docs/design.md, shared by the CLI, the
// API and the web pages).
const (
	DrivePresent  = "present"         // found, and a current key opens it
	DriveMissing  = "missing"         // not found (wave 1 said "absent")
	DriveStale    = "stale"           // locked to an old master key by a forced rotation (wave 1: "locked-to-old-key")
	DriveForeign  = "foreign"         // a LUKS2 drive of another cluster, or of none, where this drive should be
	DriveFailed   = "failed"          // there, but failing I/O
	DriveRetired  = "retired"         // crypto-erased
	DriveRotating = "rotating"        // a rotation is rewrapping it
	DriveWrongKey = "wrong-key"       // there, but no current master key opens it
	DriveDegraded = "header-degraded" // opens, but one header copy is damaged (the next change repairs it)
	DriveDamaged  = "header-damaged"  // no valid header copy, or one the allow-list refuses
)

// DriveStatus is one drive: its registry entry and what is known of it now.
type DriveStatus struct {
	UUID        string `json:"uuid"`
	Volume      string `json:"volume"`
	VolumeUUID  string `json:"volume_uuid"`
	MemberIndex int    `json:"member_index"`
	MemberCount int    `json:"member_count"`
	Path        string `json:"path"`
	State       string `json:"state"`
	// KeyID is the master key that opens it now (or, when none does, the one its
	// token names).
	KeyID      string `json:"key_id"`
	SectorSize int    `json:"sector_size"`
	// Present is true when the drive is there and opens with a current key (states
	// present, rotating, header-degraded): a serving node serves it.
	Present bool `json:"present"`
	// Added is when the drive was formatted or adopted into the registry.
	Added time.Time `json:"added"`
	// Since is when the drive entered its state, where the node knows it.
	Since *time.Time `json:"since,omitempty"`
	// LastSeen is when the drive was last found at Path.
	LastSeen *time.Time `json:"last_seen,omitempty"`
	Detail   string     `json:"detail,omitempty"`
	// Hint is what to do about the state, in words, where something can be done.
	Hint string `json:"hint,omitempty"`
}

// Volume states.
const (
	VolumeOK          = "ok"          // every member present and in sync
	VolumeDegraded    = "degraded"    // data available, redundancy reduced
	VolumeResyncing   = "resyncing"   // a member is being brought in sync
	VolumeUnavailable = "unavailable" // no in-sync member present: requests wait, then fail
)

// VolumeStatus is one volume.
type VolumeStatus struct {
	Name       string `json:"name"`
	UUID       string `json:"uuid"`
	Layout     string `json:"layout"`
	State      string `json:"state"`
	Generation uint64 `json:"generation"`
	// Size is the volume's size in bytes, known while it is served.
	Size int64 `json:"size,omitempty"`
	// Exports are the NBD export names it is served under (empty offline).
	Exports []string `json:"exports"`
	// Members are the member drives' UUIDs, in member order.
	Members []string `json:"members"`
	Detail  string   `json:"detail,omitempty"`
}

// RotateRequest asks for a master key rotation.
type RotateRequest struct {
	// Force rotates even if drives are missing: they become stale, locked to the old
	// master key for good.
	Force bool `json:"force"`
	// Step, in-process only, is called after every step of the rotation (progress
	// lines, crash tests).
	Step func(keystore.Step) `json:"-"`
}

// RotateResult is what a finished rotation reports.
type RotateResult struct {
	MasterKeyID         string    `json:"master_key_id"`
	LastKeyRotationTime time.Time `json:"last_key_rotation_time"`
	// Resumed is true when the rotation finished one that the journal recorded.
	Resumed bool `json:"resumed"`
	// StaleDrives are the drives left locked to the old key (--force).
	StaleDrives []DriveStatus `json:"stale_drives"`
}

// AddDriveRequest formats or adopts a drive.
type AddDriveRequest struct {
	// Path is the drive (absolute). With Create, an image file to create.
	Path string `json:"path"`
	// Volume names the new volume ("" picks vol0, vol1, ...).
	Volume string `json:"volume"`
	// SectorSize is 4096 (default) or 512.
	SectorSize int `json:"sector_size"`
	// Create, if > 0, creates Path as a sparse image file of this many bytes; it is
	// removed again if the request fails.
	Create int64 `json:"create"`
	// Force formats over a LUKS header, a file system or a partition table.
	Force bool `json:"force"`
	// AllowDiscards lets trims through to the drive (reveals which sectors are used).
	AllowDiscards bool `json:"allow_discards"`
	// Wipe fills the data area with encrypted zeroes.
	Wipe bool `json:"wipe"`
	// AdoptKeyFile, if set, adopts a LUKS2 drive formatted elsewhere: the absolute path
	// of a key file that opens it now (read by the node; key bytes never travel).
	AdoptKeyFile string `json:"adopt_key_file"`
	// KeepOldKeyslot keeps the adopted drive's old keyslot.
	KeepOldKeyslot bool `json:"keep_old_keyslot"`
	// Progress, in-process only, is called as a wipe advances (bytes done, of total).
	Progress func(done, total int64) `json:"-"`
}

// AddDriveResult says what AddDrive did.
type AddDriveResult struct {
	Drive DriveStatus `json:"drive"`
	// Exported is true when a serving node exports the volume now.
	Exported bool `json:"exported"`
	// Adopt only: the keyslot the old key opened (wiped unless kept) and keyslots that
	// still open the drive with other passphrases.
	OldKeyslot   *int  `json:"old_keyslot,omitempty"`
	OtherKeyslot []int `json:"other_keyslots,omitempty"`
}
