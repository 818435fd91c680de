package registry

import (
	"fmt"
	"slices"
	"time"
)

// The changes below keep the registry's rules; each bumps the generation of the volume
// whose membership or state it changes. They are methods of *Registry so that a Tx's
// registry and a test's can use them; only a Tx's Commit makes them durable.

// AddVolume registers a volume and its member drives (in member order). The volume's
// name must be free and valid, its UUID and theirs new; each drive gets the volume's
// UUID and its member index, and the volume generation 1.
func (r *Registry) AddVolume(v Volume, members []Drive) error {
	if r.Volume(v.Name) != nil || r.VolumeByUUID(v.UUID) != nil {
		return fmt.Errorf("volume %s (%s): %w", v.Name, v.UUID, ErrExists)
	}
	if len(members) == 0 {
		return fmt.Errorf("volume %s without drives: %w", v.Name, ErrInvalid)
	}
	v.Members = nil
	for i := range members {
		d := &members[i]
		if r.Drive(d.UUID) != nil {
			return fmt.Errorf("drive %s: %w", d.UUID, ErrExists)
		}
		d.VolumeUUID, d.MemberIndex = v.UUID, i
		v.Members = append(v.Members, d.UUID)
	}
	v.Generation = 1
	return r.apply(func(c *Registry) {
		c.Volumes = append(c.Volumes, v)
		c.Drives = append(c.Drives, members...)
	})
}

// ReplaceMember puts drive d in the place of member old of its volume (a drive
// reformatted, or a stale member formatted anew): old leaves the registry, d takes its
// member index.
func (r *Registry) ReplaceMember(old string, d Drive) error {
	o := r.Drive(old)
	if o == nil {
		return fmt.Errorf("drive %s: %w", old, ErrNotFound)
	}
	if d.UUID != old && r.Drive(d.UUID) != nil {
		return fmt.Errorf("drive %s: %w", d.UUID, ErrExists)
	}
	v := r.VolumeByUUID(o.VolumeUUID)
	if v == nil || !slices.Contains(v.Members, old) {
		return fmt.Errorf("drive %s is no volume's member: %w", old, ErrInvalid)
	}
	d.VolumeUUID, d.MemberIndex = o.VolumeUUID, o.MemberIndex
	vname := v.Name
	return r.apply(func(c *Registry) {
		cv := c.Volume(vname)
		cv.Members[d.MemberIndex] = d.UUID
		cv.Generation++
		c.Drives = slices.DeleteFunc(c.Drives, func(x Drive) bool { return x.UUID == old })
		c.Drives = append(c.Drives, d)
	})
}

// RemoveVolume removes the volume with this UUID and its member drives from the
// registry (the drives keep their headers and data).
func (r *Registry) RemoveVolume(id string) error {
	v := r.VolumeByUUID(id)
	if v == nil {
		return fmt.Errorf("volume %s: %w", id, ErrNotFound)
	}
	return r.apply(func(c *Registry) {
		c.Volumes = slices.DeleteFunc(c.Volumes, func(x Volume) bool { return x.UUID == id })
		c.Drives = slices.DeleteFunc(c.Drives, func(x Drive) bool { return x.VolumeUUID == id })
	})
}

// SeenAt records that drive id was found at path at time t.
func (r *Registry) SeenAt(id, path string, t time.Time) error {
	if r.Drive(id) == nil {
		return fmt.Errorf("drive %s: %w", id, ErrNotFound)
	}
	return r.apply(func(c *Registry) {
		d := c.Drive(id)
		d.Path = path
		t := t.UTC()
		d.LastSeen = &t
	})
}

// SetKeyID records the master key that wraps drive id's keyslot now.
func (r *Registry) SetKeyID(id, keyID string) error {
	if r.Drive(id) == nil {
		return fmt.Errorf("drive %s: %w", id, ErrNotFound)
	}
	return r.apply(func(c *Registry) { c.Drive(id).KeyID = keyID })
}

// MarkStale records that drive id is locked to an old master key for good.
func (r *Registry) MarkStale(id string) error {
	d := r.Drive(id)
	if d == nil {
		return fmt.Errorf("drive %s: %w", id, ErrNotFound)
	}
	if d.State == DriveStale {
		return nil
	}
	return r.apply(func(c *Registry) {
		d := c.Drive(id)
		d.State = DriveStale
		if v := c.VolumeByUUID(d.VolumeUUID); v != nil {
			v.Generation++
		}
	})
}

// apply runs change on a copy and keeps the copy only if it is valid, so that a change
// that would break a rule leaves r as it was.
func (r *Registry) apply(change func(*Registry)) error {
	c := r.Clone()
	change(c)
	if err := c.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	*r = *c
	return nil
}
