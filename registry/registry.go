// Package registry is the inventory of a node's storage: the volumes, and the drives that
// hold them (which drive is which member of which volume, wrapped by which master key,
// last seen where). It records what the node should have; what it has at a given moment
// (a drive present, missing, failing) is the node's run-time knowledge, not stored here.
//
// The registry is kept apart from the key custody (package keystore): the master key and
// the rotation journal may one day live elsewhere (a KMS, a TPM) without the inventory
// moving, and the inventory may live in a replicated store (a cluster of nodes) while
// each node keeps its master key on its own boot drive.
//
// A Registry is plain data; a Store keeps it. Reading takes no lock (Store.Load returns a
// snapshot). Changing goes through a *Tx, which only Store.Begin hands out and which
// holds the store's lock until Close: the type proves the lock is held, and Commit
// writes the whole registry atomically. A Registry value is not safe for concurrent
// mutation; Stores are safe for concurrent use.
//
// The on-disk format (registry.json) is documented in docs/registry.md.
package registry

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
)

// FormatName and FormatVersion identify registry.json; another name or version is
// refused, never rewritten.
const (
	FormatName    = "atrest-registry"
	FormatVersion = 1
)

// Layout is how a volume spreads over its drives.
type Layout string

const (
	// LayoutSingle is a volume of one drive.
	LayoutSingle Layout = "single"
	// LayoutMirror is a volume whose members hold the same ciphertext.
	LayoutMirror Layout = "mirror"
)

// DriveState is a drive's standing in the registry. Whether the drive is present is
// run-time knowledge of the node, not a state kept here.
type DriveState string

const (
	// DriveActive: a member in service.
	DriveActive DriveState = "active"
	// DriveStale: locked to an old master key by a forced rotation while it was
	// missing; it is never served again and can only come back formatted as a new
	// member.
	DriveStale DriveState = "stale"
	// DriveRetired: crypto-erased; no key opens it any more.
	DriveRetired DriveState = "retired"
)

// Volume is a volume of the cluster.
type Volume struct {
	UUID   string `json:"uuid"`
	Name   string `json:"name"`
	Layout Layout `json:"layout"`
	// Members are the UUIDs of the member drives, in member order.
	Members []string `json:"members"`
	// Generation counts the changes of the volume's membership and state (the event
	// count that mirror members also record; theirs is authoritative for I/O).
	Generation uint64    `json:"generation"`
	Created    time.Time `json:"created"`
}

// Drive is a drive of the cluster.
type Drive struct {
	UUID        string     `json:"uuid"` // the LUKS2 header's UUID
	VolumeUUID  string     `json:"volume_uuid"`
	MemberIndex int        `json:"member_index"`
	KeyID       string     `json:"key_id"` // master key that wraps its keyslot
	Path        string     `json:"path"`   // absolute; where it was last seen
	SectorSize  int        `json:"sector_size"`
	State       DriveState `json:"state"`
	Added       time.Time  `json:"added"`
	LastSeen    *time.Time `json:"last_seen"` // when it was last found at Path; nil: not since added
}

// Registry is the content of registry.json.
type Registry struct {
	Format      string   `json:"format"`
	Version     int      `json:"version"`
	ClusterUUID string   `json:"cluster_uuid"`
	Volumes     []Volume `json:"volumes"`
	Drives      []Drive  `json:"drives"`
}

var (
	// ErrCorrupt: registry.json does not parse or contradicts itself.
	ErrCorrupt = errors.New("corrupt registry")
	// ErrNotFound: no volume or drive answers to the name given.
	ErrNotFound = errors.New("not in the registry")
	// ErrAmbiguous: a drive prefix matches several drives.
	ErrAmbiguous = errors.New("ambiguous drive name")
	// ErrExists: a volume name, volume UUID or drive UUID is already taken.
	ErrExists = errors.New("already in the registry")
	// ErrInvalid: a change would break a rule of the registry (the error says which).
	ErrInvalid = errors.New("invalid registry change")
	// ErrNoRegistry: the store holds no registry yet.
	ErrNoRegistry = errors.New("no registry")
)

// New returns an empty registry of the cluster.
func New(cluster string) *Registry {
	return &Registry{Format: FormatName, Version: FormatVersion, ClusterUUID: cluster, Volumes: []Volume{}, Drives: []Drive{}}
}

var (
	keyIDPattern  = regexp.MustCompile(`^mk-[0-9a-f]{16}$`)
	volumePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
)

// ValidVolumeName reports whether name can name a volume (it becomes an NBD export
// name and a file name): 1 to 64 letters, digits, '.', '_' or '-', not starting with
// punctuation.
func ValidVolumeName(name string) bool { return volumePattern.MatchString(name) }

// ValidKeyID reports whether id has the form of a master key id (mk- and 16 hex digits).
func ValidKeyID(id string) bool { return keyIDPattern.MatchString(id) }

// ValidUUID reports whether s is a UUID in its canonical 36-character form.
func ValidUUID(s string) bool {
	_, err := uuid.Parse(s)
	return err == nil && len(s) == 36 && strings.ToLower(s) == s
}

// MinPrefix is the shortest UUID prefix that names a drive.
const MinPrefix = 8

// maxSize bounds registry.json.
const maxSize = 64 << 20

// Parse decodes and validates registry.json. Unknown fields, another format or version,
// trailing data and inconsistencies are errors wrapping ErrCorrupt.
func Parse(b []byte) (*Registry, error) {
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
	var r Registry
	if err := d.Decode(&r); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if _, err := d.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: trailing data after the JSON object", ErrCorrupt)
	}
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return &r, nil
}

// Marshal encodes the registry as registry.json (indented, newline-terminated). It
// panics on an invalid registry: writers validate before they get here.
func (r *Registry) Marshal() []byte {
	if err := r.Validate(); err != nil {
		panic("BUG: registry: writing an invalid registry: " + err.Error())
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		panic("BUG: registry: does not marshal: " + err.Error())
	}
	return append(b, '\n')
}

// Clone returns a deep copy.
func (r *Registry) Clone() *Registry {
	c := *r
	c.Volumes = slices.Clone(r.Volumes)
	for i := range c.Volumes {
		c.Volumes[i].Members = slices.Clone(c.Volumes[i].Members)
	}
	c.Drives = slices.Clone(r.Drives)
	for i := range c.Drives {
		if t := c.Drives[i].LastSeen; t != nil {
			tt := *t
			c.Drives[i].LastSeen = &tt
		}
	}
	return &c
}

// Validate checks every rule of the registry: well-formed fields, unique UUIDs and
// volume names, members that are registered drives of their volume at their index,
// absolute clean paths, and active drives that are members.
func (r *Registry) Validate() error {
	if r.Format != FormatName || r.Version != FormatVersion {
		return fmt.Errorf("format %q version %d", r.Format, r.Version)
	}
	if !ValidUUID(r.ClusterUUID) {
		return fmt.Errorf("cluster_uuid %q is not a UUID", r.ClusterUUID)
	}
	if r.Volumes == nil || r.Drives == nil {
		return errors.New("volumes or drives is missing")
	}
	drives := make(map[string]*Drive, len(r.Drives))
	for i := range r.Drives {
		d := &r.Drives[i]
		if err := d.validate(); err != nil {
			return fmt.Errorf("drives[%d]: %w", i, err)
		}
		if drives[d.UUID] != nil {
			return fmt.Errorf("drive %s is listed twice", d.UUID)
		}
		drives[d.UUID] = d
	}
	volumes := make(map[string]*Volume, len(r.Volumes))
	names := make(map[string]bool, len(r.Volumes))
	member := make(map[string]bool, len(r.Drives))
	for i := range r.Volumes {
		v := &r.Volumes[i]
		if err := v.validate(); err != nil {
			return fmt.Errorf("volumes[%d]: %w", i, err)
		}
		if volumes[v.UUID] != nil || names[v.Name] {
			return fmt.Errorf("volume %s (%s) is listed twice", v.Name, v.UUID)
		}
		volumes[v.UUID], names[v.Name] = v, true
		for j, m := range v.Members {
			d := drives[m]
			switch {
			case d == nil:
				return fmt.Errorf("volume %s: member %d is drive %s, which is not registered", v.Name, j, m)
			case member[m]:
				return fmt.Errorf("drive %s is a member twice", m)
			case d.VolumeUUID != v.UUID || d.MemberIndex != j:
				return fmt.Errorf("volume %s: member %d is drive %s, which records volume %s member %d", v.Name, j, m, d.VolumeUUID, d.MemberIndex)
			case d.State == DriveRetired:
				return fmt.Errorf("volume %s: member %d is drive %s, which is retired", v.Name, j, m)
			}
			member[m] = true
		}
	}
	for _, d := range r.Drives {
		if d.State == DriveActive && !member[d.UUID] {
			return fmt.Errorf("drive %s is active but no volume's member", d.UUID)
		}
		if d.State != DriveRetired && volumes[d.VolumeUUID] == nil {
			return fmt.Errorf("drive %s records volume %s, which is not registered", d.UUID, d.VolumeUUID)
		}
	}
	return nil
}

func (v *Volume) validate() error {
	switch {
	case !ValidUUID(v.UUID):
		return fmt.Errorf("uuid %q is not a UUID", v.UUID)
	case !ValidVolumeName(v.Name):
		return fmt.Errorf("name %q is not a volume name", v.Name)
	case v.Layout != LayoutSingle && v.Layout != LayoutMirror:
		return fmt.Errorf("layout %q", v.Layout)
	case len(v.Members) == 0:
		return fmt.Errorf("volume %s has no member", v.Name)
	case v.Layout == LayoutSingle && len(v.Members) != 1:
		return fmt.Errorf("volume %s of layout single has %d members", v.Name, len(v.Members))
	case v.Generation == 0:
		return fmt.Errorf("volume %s has generation 0", v.Name)
	case v.Created.IsZero():
		return fmt.Errorf("volume %s has no creation time", v.Name)
	}
	return nil
}

func (d *Drive) validate() error {
	switch {
	case !ValidUUID(d.UUID):
		return fmt.Errorf("uuid %q is not a UUID", d.UUID)
	case !ValidUUID(d.VolumeUUID):
		return fmt.Errorf("drive %s: volume_uuid %q is not a UUID", d.UUID, d.VolumeUUID)
	case d.MemberIndex < 0:
		return fmt.Errorf("drive %s: member_index %d", d.UUID, d.MemberIndex)
	case !ValidKeyID(d.KeyID):
		return fmt.Errorf("drive %s: key_id %q is not a key id", d.UUID, d.KeyID)
	case !filepath.IsAbs(d.Path) || filepath.Clean(d.Path) != d.Path:
		return fmt.Errorf("drive %s: path %q is not an absolute, clean path", d.UUID, d.Path)
	case d.SectorSize != 512 && d.SectorSize != 4096:
		return fmt.Errorf("drive %s: sector_size %d", d.UUID, d.SectorSize)
	case d.State != DriveActive && d.State != DriveStale && d.State != DriveRetired:
		return fmt.Errorf("drive %s: state %q", d.UUID, d.State)
	case d.Added.IsZero():
		return fmt.Errorf("drive %s has no time added", d.UUID)
	}
	return nil
}
