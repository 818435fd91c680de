package registry

import (
	"fmt"
	"path/filepath"
	"strings"
)

// Volume returns the volume of the given name, or nil.
func (r *Registry) Volume(name string) *Volume {
	for i := range r.Volumes {
		if r.Volumes[i].Name == name {
			return &r.Volumes[i]
		}
	}
	return nil
}

// VolumeByUUID returns the volume with the given UUID, or nil.
func (r *Registry) VolumeByUUID(id string) *Volume {
	for i := range r.Volumes {
		if r.Volumes[i].UUID == id {
			return &r.Volumes[i]
		}
	}
	return nil
}

// Drive returns the drive with the given UUID, or nil.
func (r *Registry) Drive(id string) *Drive {
	for i := range r.Drives {
		if r.Drives[i].UUID == id {
			return &r.Drives[i]
		}
	}
	return nil
}

// VolumeDrives returns the member drives of v, in member order.
func (r *Registry) VolumeDrives(v *Volume) []*Drive {
	out := make([]*Drive, 0, len(v.Members))
	for _, m := range v.Members {
		if d := r.Drive(m); d != nil {
			out = append(out, d)
		}
	}
	return out
}

// FindDrive resolves a drive as an administrator names it: its UUID, a unique prefix
// of its UUID of at least MinPrefix characters, or the path where it was last seen (as
// given, or after resolving symlinks). Errors match ErrNotFound or ErrAmbiguous.
func (r *Registry) FindDrive(name string) (*Drive, error) {
	if name == "" {
		return nil, fmt.Errorf("an empty drive name: %w", ErrNotFound)
	}
	if d := r.Drive(name); d != nil {
		return d, nil
	}
	if strings.ContainsRune(name, '/') {
		return r.driveAtPath(name)
	}
	if len(name) < MinPrefix {
		return nil, fmt.Errorf("drive %q: a UUID prefix needs at least %d characters: %w", name, MinPrefix, ErrNotFound)
	}
	var found *Drive
	for i := range r.Drives {
		if strings.HasPrefix(r.Drives[i].UUID, strings.ToLower(name)) {
			if found != nil {
				return nil, fmt.Errorf("drive %q matches %s and %s: %w", name, found.UUID, r.Drives[i].UUID, ErrAmbiguous)
			}
			found = &r.Drives[i]
		}
	}
	if found == nil {
		return nil, fmt.Errorf("drive %q: %w", name, ErrNotFound)
	}
	return found, nil
}

func (r *Registry) driveAtPath(path string) (*Drive, error) {
	candidates := []string{filepath.Clean(path)}
	if abs, err := filepath.Abs(path); err == nil {
		candidates = append(candidates, abs)
	}
	if real, err := filepath.EvalSymlinks(path); err == nil {
		candidates = append(candidates, real)
	}
	for _, p := range candidates {
		var found *Drive
		for i := range r.Drives {
			d := &r.Drives[i]
			if d.Path == p && d.State != DriveRetired {
				if found != nil {
					return nil, fmt.Errorf("path %s was last seen holding drives %s and %s: %w", path, found.UUID, d.UUID, ErrAmbiguous)
				}
				found = d
			}
		}
		if found != nil {
			return found, nil
		}
	}
	return nil, fmt.Errorf("no drive was last seen at %s: %w", path, ErrNotFound)
}

// NewVolumeName returns name if it is valid and free, or, for "", the first free
// vol0, vol1, ...
func (r *Registry) NewVolumeName(name string) (string, error) {
	if name == "" {
		for i := 0; ; i++ {
			if n := fmt.Sprintf("vol%d", i); r.Volume(n) == nil {
				return n, nil
			}
		}
	}
	if !ValidVolumeName(name) {
		return "", fmt.Errorf("volume name %q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit: %w", name, ErrInvalid)
	}
	if r.Volume(name) != nil {
		return "", fmt.Errorf("volume %q: %w", name, ErrExists)
	}
	return name, nil
}
