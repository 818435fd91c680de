package node

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/registry"
)

// EncryptionStatus answers in the product's shape: atrest always encrypts, with the
// master key on the node's boot drive.
func (n *Node) EncryptionStatus(ctx context.Context) (*EncryptionStatus, error) {
	k, err := keystore.Open(n.dir)
	if err != nil {
		return nil, err
	}
	return &EncryptionStatus{Status: "Encrypted", Type: "Local", LastKeyRotationTime: k.State().LastRotation}, nil
}

// Status reads the custody state and the registry and checks every drive with the very
// checks that serving applies (drive.Check: the header, the token, a key that opens it,
// the data segment within the drive), so that it never calls present a drive the daemon
// would refuse. It writes nothing and takes no lock. A serving node adds what only it
// knows: since when a drive is in its state, the volumes' export names and sizes.
func (n *Node) Status(ctx context.Context) (*Status, error) {
	k, r, err := n.snapshot(ctx)
	if err != nil {
		return nil, err
	}
	s := k.State()
	now := n.now()
	st := &Status{
		DataEncrypted: true, Type: "software", Cipher: "AES-256-XTS",
		ClusterUUID: s.ClusterUUID, Keystore: n.dir,
		MasterKeyID: s.MasterKey.ID, MasterKeyCreated: s.MasterKey.Created,
		MasterKeyAge: int64(now.Sub(s.MasterKey.Created) / time.Second),
		LastRotation: s.LastRotation, RotationUnderWay: s.Rotation != nil,
		Serving: n.serving(), Volumes: []VolumeStatus{}, Drives: []DriveStatus{}, Advice: []string{},
	}
	journal := journalStates(s)
	if j := s.Rotation; j != nil {
		st.Rotation = &RotationStatus{Started: j.Started, OldKeyID: j.OldKeyID, NewKeyID: j.NewKey.ID, Phase: j.Phase}
		for _, rd := range j.Drives {
			if rd.State == keystore.RotDone || rd.State == keystore.RotAbsent {
				st.Rotation.DrivesDone++
			} else {
				st.Rotation.DrivesLeft++
			}
		}
		st.Advice = append(st.Advice, "a key rotation is under way: if no 'atrest rotate-encryption-keys' is running, run it again to finish it")
	}
	for i := range r.Drives {
		ds, err := n.driveStatus(k, r, &r.Drives[i], journal)
		if err != nil {
			return nil, err
		}
		st.Drives = append(st.Drives, ds)
	}
	for i := range r.Volumes {
		st.Volumes = append(st.Volumes, n.volumeStatus(r, &r.Volumes[i], st.Drives))
	}
	st.Advice = append(st.Advice, advice(s, r, st.Drives)...)
	return st, nil
}

// journalStates gives each drive of a rotation under way its step in the journal.
func journalStates(s keystore.State) map[string]string {
	m := map[string]string{}
	if j := s.Rotation; j != nil {
		for _, rd := range j.Drives {
			m[rd.UUID] = rd.State
		}
	}
	return m
}

// driveStatus is one registry drive with its health: stale and retired drives from
// the registry alone, active ones checked.
func (n *Node) driveStatus(k *keystore.Keystore, r *registry.Registry, d *registry.Drive, journal map[string]string) (DriveStatus, error) {
	ds := DriveStatus{
		UUID: d.UUID, VolumeUUID: d.VolumeUUID, MemberIndex: d.MemberIndex, MemberCount: 1,
		Path: d.Path, KeyID: d.KeyID, SectorSize: d.SectorSize, Added: d.Added, LastSeen: d.LastSeen,
	}
	if v := r.VolumeByUUID(d.VolumeUUID); v != nil {
		ds.Volume, ds.MemberCount = v.Name, len(v.Members)
	}
	switch d.State {
	case registry.DriveStale:
		ds.State = DriveStale
		ds.Detail = "locked to an old master key by a forced rotation while it was missing"
		ds.Hint = fmt.Sprintf("it can only come back as a new member: 'atrest drive format --force --volume %s %s' (its data is lost; the volume's other copies, if any, keep theirs)", ds.Volume, d.Path)
		return ds, nil
	case registry.DriveRetired:
		ds.State = DriveRetired
		return ds, nil
	}
	h, err := drive.Check(d.Path, drive.UnlockOptions{ClusterUUID: k.ClusterUUID(), UUID: d.UUID, Keys: k.Keys})
	if err != nil {
		return ds, err
	}
	ds.Detail = h.Detail
	if h.KeyID != "" {
		ds.KeyID = h.KeyID
	}
	switch h.State {
	case drive.StatePresent:
		ds.State = DrivePresent
	case drive.StateMissing, drive.StateFailed:
		// Not where it was, or there but not answering (a pulled drive behind a loop
		// device): to the administrator, both are a drive to find or reattach.
		ds.State = DriveMissing
		ds.Hint = "reattach the drive; atrest finds it by its UUID"
	case drive.StateForeign:
		ds.State = DriveForeign
		ds.Hint = fmt.Sprintf("%s holds a LUKS2 drive that is not this cluster's drive %s: put the right drive back", d.Path, d.UUID)
	case drive.StateWrongKey:
		ds.State = DriveWrongKey
		ds.Hint = "no master key of this keystore opens it: a keystore backup from before a rotation holds a retired key"
	case drive.StateDegraded:
		ds.State = DriveDegraded
		ds.Detail += " (the next rotation, or any change, repairs it)"
	case drive.StateDamaged:
		ds.State = DriveDamaged
		ds.Hint = "restore the header from a backup (cryptsetup luksHeaderRestore) if you have one"
	default:
		ds.State = h.State
	}
	if js, ok := journal[d.UUID]; ok && js != keystore.RotDone && ds.State == DrivePresent {
		ds.State, ds.Detail = DriveRotating, "rotation step: "+js
	}
	ds.Present = ds.State == DrivePresent || ds.State == DriveRotating || ds.State == DriveDegraded
	if v := n.servedVolume(d.VolumeUUID); v != nil && ds.Present {
		since := v.since
		ds.Since = &since
	}
	return ds, nil
}

// volumeStatus is one volume, from its members' status and, while serving, its
// exports.
func (n *Node) volumeStatus(r *registry.Registry, v *registry.Volume, drives []DriveStatus) VolumeStatus {
	vs := VolumeStatus{Name: v.Name, UUID: v.UUID, Layout: string(v.Layout), Generation: v.Generation,
		Members: slices.Clone(v.Members), Exports: []string{}}
	present := 0
	for _, m := range v.Members {
		for _, d := range drives {
			if d.UUID == m && d.Present {
				present++
			}
		}
	}
	switch {
	case present == len(v.Members):
		vs.State = VolumeOK
	case present > 0:
		vs.State = VolumeDegraded
	default:
		vs.State = VolumeUnavailable
		vs.Detail = "no member drive is present"
	}
	if sv := n.servedVolume(v.UUID); sv != nil {
		vs.Exports, vs.Size = slices.Clone(sv.exports), sv.drive.Device.Size()
	} else if why := n.failure(v.UUID); why != "" {
		vs.Detail = why
	}
	return vs
}

// advice is what the administrator should do, in words.
func advice(s keystore.State, r *registry.Registry, drives []DriveStatus) []string {
	var out []string
	for _, d := range drives {
		if d.State == DriveStale {
			out = append(out, fmt.Sprintf("drive %s (volume %s) is stale: %s", d.UUID, d.Volume, d.Hint))
		}
	}
	// The product's rule: after a drive replacement, rotate the master key, so that the
	// key that opened the drive taken out opens nothing any more.
	for _, v := range r.Volumes {
		if v.Generation < 2 {
			continue
		}
		for _, d := range r.VolumeDrives(&v) {
			if s.LastRotation == nil || d.Added.After(*s.LastRotation) {
				out = append(out, fmt.Sprintf("volume %s had a member replaced since the last key rotation: rotate the master key (atrest rotate-encryption-keys), so that the drive taken out opens with no key in service", v.Name))
				break
			}
		}
	}
	return out
}

// Drives lists the drives of the registry with their status.
func (n *Node) Drives(ctx context.Context) ([]DriveStatus, error) {
	st, err := n.Status(ctx)
	if err != nil {
		return nil, err
	}
	return st.Drives, nil
}

// Drive finds one drive by UUID, unique UUID prefix or path (registry.FindDrive).
func (n *Node) Drive(ctx context.Context, name string) (*DriveStatus, error) {
	k, r, err := n.snapshot(ctx)
	if err != nil {
		return nil, err
	}
	d, err := r.FindDrive(name)
	if err != nil {
		return nil, err
	}
	ds, err := n.driveStatus(k, r, d, journalStates(k.State()))
	if err != nil {
		return nil, err
	}
	return &ds, nil
}

// Volumes lists the volumes.
func (n *Node) Volumes(ctx context.Context) ([]VolumeStatus, error) {
	st, err := n.Status(ctx)
	if err != nil {
		return nil, err
	}
	return st.Volumes, nil
}

// Volume returns one volume by name.
func (n *Node) Volume(ctx context.Context, name string) (*VolumeStatus, error) {
	k, r, err := n.snapshot(ctx)
	if err != nil {
		return nil, err
	}
	v := r.Volume(name)
	if v == nil {
		return nil, fmt.Errorf("volume %q: %w", name, ErrNotFound)
	}
	// Its members only: the other drives' headers need not be read.
	journal := journalStates(k.State())
	var drives []DriveStatus
	for _, d := range r.VolumeDrives(v) {
		ds, err := n.driveStatus(k, r, d, journal)
		if err != nil {
			return nil, err
		}
		drives = append(drives, ds)
	}
	vs := n.volumeStatus(r, v, drives)
	return &vs, nil
}
