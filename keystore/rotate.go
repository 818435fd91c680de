package keystore

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/luks2"
)

// Rotation steps reported to RotateOptions.Step, in order; the drive steps repeat
// for each drive. Every step is reported after what it names is durable, so a crash
// right after any of them is a crash at a step boundary (the crash tests stop the
// process at each).
const (
	StepResume         = "resume"            // a journal was found: resuming
	StepNextKeyWritten = "next-key-written"  // master.key.next is durable
	StepJournal        = "journal-recorded"  // the journal names the new key
	StepDriveStart     = "drive-start"       // old slot recorded (state adding)
	StepDriveAdded     = "drive-added"       // new keyslot written
	StepDriveVerified  = "drive-verified"    // new key opens it (state wiping)
	StepDriveWiped     = "drive-wiped"       // old keyslot wiped and removed
	StepDriveDone      = "drive-done"        // token updated (state done)
	StepDriveAbsent    = "drive-absent"      // absent, left to the old key (--force)
	StepCommit         = "commit-recorded"   // every drive done: phase commit
	StepOldKeyDestroy  = "old-key-destroyed" // master.key overwritten in place
	StepKeyReplaced    = "master-key-replaced"
	StepFinished       = "finished" // journal cleared, last rotation recorded
)

// Step is a rotation progress report.
type Step struct {
	Name  string
	Drive *Drive // drive steps only
	Index int    // drive steps: 1-based position among the drives
	Total int    // drive steps: number of drives in the rotation
}

// RotateOptions configure Rotate.
type RotateOptions struct {
	// Force rotates even if registered drives are absent: they stay locked to the
	// old master key for good and are marked so in the registry.
	Force bool
	// Step, if set, is called after each step (progress; test crash points).
	Step func(Step)
}

// MissingError lists the absent drives that made Rotate refuse.
type MissingError struct {
	Drives []Drive
	// Rewrapping: the drive vanished while the rotation was rewrapping it, so Force
	// cannot leave it out; it must come back.
	Rewrapping bool
}

func (e *MissingError) Error() string {
	var s []string
	for _, d := range e.Drives {
		s = append(s, fmt.Sprintf("%s (volume %s, last seen at %s)", d.UUID, d.Volume, d.Path))
	}
	msg := fmt.Sprintf("%d drive(s) absent: %s", len(e.Drives), strings.Join(s, ", "))
	if e.Rewrapping {
		msg += " (being rewrapped: it cannot be left out)"
	}
	return msg
}

func (e *MissingError) Unwrap() error { return ErrDriveMissing }

// Rotate replaces the master key (DESIGN §4): it writes the new key to
// master.key.next and records the journal; for each drive it adds a keyslot wrapping
// the drive's (unchanged) data key with the new key, verifies it, wipes the old
// keyslot and updates the token; then it replaces master.key atomically, destroys the
// old key, records the rotation time and clears the journal. Each step is durable
// before the next starts, and the journal says which key opens which drive, so a
// crash anywhere leaves every drive openable (Unlock tries both keys) and a rerun
// finishes the rotation. A rotation found in the journal is resumed.
func (k *Keystore) Rotate(ctx context.Context, o RotateOptions) error {
	if !k.lockHeld() {
		panic("BUG: keystore: Rotate without the lock")
	}
	step := func(s Step) {
		if o.Step != nil {
			o.Step(s)
		}
	}
	if k.state.Rotation == nil {
		if err := k.startRotation(o, step); err != nil {
			return err
		}
	} else {
		step(Step{Name: StepResume})
	}
	r := k.state.Rotation
	if r.Phase == PhaseDrives {
		oldKey, err := readKey(k.path(MasterKeyFile))
		if err != nil {
			return err
		}
		defer clear(oldKey)
		if id := KeyID(oldKey); id != r.OldKeyID {
			return fmt.Errorf("%s holds key %s, the journal expects %s: %w", MasterKeyFile, id, r.OldKeyID, ErrCorrupt)
		}
		newKey, err := readKey(k.path(NextKeyFile))
		if err != nil {
			return fmt.Errorf("the rotation journal needs the new key: %w", err)
		}
		defer clear(newKey)
		if id := KeyID(newKey); id != r.NewKey.ID {
			return fmt.Errorf("%s holds key %s, the journal expects %s: %w", NextKeyFile, id, r.NewKey.ID, ErrCorrupt)
		}
		for i := range r.Drives {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("key rotation interrupted (rerun to finish it): %w", err)
			}
			if err := k.rotateDrive(i, oldKey, newKey, o, step); err != nil {
				return err
			}
		}
		r.Phase = PhaseCommit
		if err := k.save(); err != nil {
			return err
		}
		step(Step{Name: StepCommit})
	}
	if err := k.replaceMasterKey(step); err != nil {
		return err
	}
	now := k.now()
	for _, rd := range r.Drives {
		d := k.state.drive(rd.UUID)
		if rd.State == RotDone {
			d.KeyID = r.NewKey.ID
		} else {
			d.State = DriveRetired
		}
	}
	k.state.MasterKey = r.NewKey
	k.state.LastRotation = &now
	k.state.Rotation = nil
	if err := k.save(); err != nil {
		return err
	}
	step(Step{Name: StepFinished})
	return nil
}

// startRotation checks that the drives are there, writes the new key and records
// the journal.
func (k *Keystore) startRotation(o RotateOptions, step func(Step)) error {
	var missing []Drive
	r := &Rotation{Started: k.now(), OldKeyID: k.state.MasterKey.ID, Phase: PhaseDrives, Drives: []RotationDrive{}}
	for _, d := range k.state.Drives {
		if d.State != DriveActive {
			continue
		}
		rd := RotationDrive{UUID: d.UUID, State: RotPending, OldSlot: -1, NewSlot: -1}
		if err := probe(d); err != nil {
			if !errors.Is(err, ErrDriveMissing) {
				return err
			}
			missing = append(missing, d)
			rd.State = RotAbsent
		}
		r.Drives = append(r.Drives, rd)
	}
	if len(missing) > 0 && !o.Force {
		return &MissingError{Drives: missing}
	}
	newKey := newMasterKey()
	defer clear(newKey)
	r.NewKey = KeyInfo{ID: KeyID(newKey), Created: k.now()}
	// The key is durable before the journal names it, so that a journal never
	// names a key that is lost. A crash in between leaves a stray next key that the
	// next start overwrites.
	if err := writeAtomic(k.dir, NextKeyFile, newKey); err != nil {
		return err
	}
	step(Step{Name: StepNextKeyWritten})
	k.state.Rotation = r
	if err := k.save(); err != nil {
		k.state.Rotation = nil
		return err
	}
	step(Step{Name: StepJournal})
	for _, rd := range r.Drives {
		if rd.State == RotAbsent {
			step(Step{Name: StepDriveAbsent, Drive: k.state.drive(rd.UUID)})
		}
	}
	return nil
}

// probe checks that the drive is at its path: a LUKS2 header with its UUID.
func probe(d Drive) error {
	dev, err := openDriveReadOnly(d.Path)
	if err != nil {
		return fmt.Errorf("drive %s at %s: %v: %w", d.UUID, d.Path, err, ErrDriveMissing)
	}
	defer dev.Close()
	h, err := luks2.Load(dev)
	if err != nil {
		if errors.Is(err, luks2.ErrNotLUKS) {
			return fmt.Errorf("drive %s at %s: %v: %w", d.UUID, d.Path, err, ErrDriveMissing)
		}
		return fmt.Errorf("drive %s at %s: %w", d.UUID, d.Path, err)
	}
	if h.UUID() != d.UUID {
		return fmt.Errorf("drive %s: %s holds drive %s instead: %w", d.UUID, d.Path, h.UUID(), ErrDriveMissing)
	}
	return nil
}

// rotateDrive moves drive i of the journal on from wherever it stands to done.
func (k *Keystore) rotateDrive(i int, oldKey, newKey []byte, o RotateOptions, step func(Step)) error {
	r := k.state.Rotation
	rd := &r.Drives[i]
	if rd.State == RotDone || rd.State == RotAbsent {
		return nil
	}
	d := k.state.drive(rd.UUID)
	at := Step{Drive: d, Index: i + 1, Total: len(r.Drives)}
	if err := probe(*d); err != nil {
		if errors.Is(err, ErrDriveMissing) && rd.State == RotPending && o.Force {
			rd.State = RotAbsent
			at.Name = StepDriveAbsent
			if err := k.save(); err != nil {
				return err
			}
			step(at)
			return nil
		}
		if errors.Is(err, ErrDriveMissing) {
			return &MissingError{Drives: []Drive{*d}, Rewrapping: rd.State != RotPending}
		}
		return err
	}
	dev, err := openDrive(d.Path)
	if err != nil {
		return err
	}
	defer dev.Close()
	h, err := loadHeader(dev, d.Path, true)
	if err != nil {
		return err
	}
	if rd.State == RotPending {
		vk, slot, err := h.UnlockAny(dev, atrestSlots(h), oldKey)
		if errors.Is(err, luks2.ErrWrongKey) {
			return fmt.Errorf("%s: the current master key does not open drive %s: %w", d.Path, d.UUID, err)
		}
		if err != nil {
			return fmt.Errorf("%s: drive %s: %w", d.Path, d.UUID, err)
		}
		clear(vk)
		rd.OldSlot, rd.State = slot, RotAdding
		if err := k.save(); err != nil {
			return err
		}
		at.Name = StepDriveStart
		step(at)
	}
	if rd.State == RotAdding {
		// A previous run may have written the new slot already.
		var others []int
		for _, s := range atrestSlots(h) {
			if s != rd.OldSlot {
				others = append(others, s)
			}
		}
		vk, slot, err := h.UnlockAny(dev, others, newKey)
		if err != nil {
			// Not written yet, unless a slot could not be read; one outside the
			// allow-list (an adopted drive's old passphrase) is not atrest's.
			if !errors.Is(err, luks2.ErrWrongKey) && !errors.Is(err, luks2.ErrUnsupported) {
				return fmt.Errorf("%s: %w", d.Path, err)
			}
			if vk, err = h.UnlockSlot(dev, rd.OldSlot, oldKey); err != nil {
				return fmt.Errorf("%s: keyslot %d of drive %s: %w", d.Path, rd.OldSlot, d.UUID, err)
			}
			if slot, err = h.AddKeyslot(dev, vk, newKey); err != nil {
				clear(vk)
				return fmt.Errorf("%s: %w", d.Path, err)
			}
			at.Name = StepDriveAdded
			step(at)
		}
		err = verifySlot(dev, d.Path, slot, newKey, vk)
		clear(vk)
		if err != nil {
			return err
		}
		rd.NewSlot, rd.State = slot, RotWiping
		if err := k.save(); err != nil {
			return err
		}
		at.Name = StepDriveVerified
		step(at)
	}
	// RotWiping.
	if slices.ContainsFunc(h.Keyslots(), func(ks luks2.Keyslot) bool { return ks.ID == rd.OldSlot }) && rd.OldSlot != rd.NewSlot {
		if err := h.WipeKeyslot(dev, rd.OldSlot); err != nil {
			return fmt.Errorf("%s: %w", d.Path, err)
		}
		at.Name = StepDriveWiped
		step(at)
	}
	t, err := h.AtrestToken()
	if err != nil {
		return fmt.Errorf("%s: %w", d.Path, err)
	}
	if t == nil {
		t = d.token(k.state.ClusterUUID)
	}
	t.Keyslots, t.MasterKeyID = []int{rd.NewSlot}, r.NewKey.ID
	if err := h.SetAtrestToken(dev, t); err != nil {
		return fmt.Errorf("%s: %w", d.Path, err)
	}
	rd.State = RotDone
	if err := k.save(); err != nil {
		return err
	}
	at.Name = StepDriveDone
	step(at)
	return nil
}

// replaceMasterKey makes the new key the master key: the old key is overwritten in
// place and flushed (while master.key.next still holds the new one), then
// master.key.next is renamed over master.key and the directory flushed. Rerunnable:
// each part checks whether it already happened.
func (k *Keystore) replaceMasterKey(step func(Step)) error {
	r := k.state.Rotation
	next, cur := k.path(NextKeyFile), k.path(MasterKeyFile)
	newKey, err := readKey(next)
	if errors.Is(err, fs.ErrNotExist) {
		// Renamed already: master.key must be the new key.
		key, err := readKey(cur)
		if err != nil {
			return err
		}
		defer clear(key)
		if KeyID(key) != r.NewKey.ID {
			return fmt.Errorf("%s is missing and %s is not the new key: %w", NextKeyFile, MasterKeyFile, ErrCorrupt)
		}
		return nil
	}
	if err != nil {
		return err
	}
	defer clear(newKey)
	if KeyID(newKey) != r.NewKey.ID {
		return fmt.Errorf("%s is not the key the journal names: %w", NextKeyFile, ErrCorrupt)
	}
	if old, err := readKey(cur); err == nil && KeyID(old) == r.OldKeyID {
		clear(old)
		if err := destroyInPlace(cur); err != nil {
			return err
		}
		step(Step{Name: StepOldKeyDestroy})
	}
	if err := os.Rename(next, cur); err != nil {
		return err
	}
	if err := syncDir(k.dir); err != nil {
		return err
	}
	step(Step{Name: StepKeyReplaced})
	return nil
}

// destroyInPlace overwrites a key file's bytes with random ones and flushes them.
// On a journaling or copy-on-write file system, or a flash drive, older copies of
// the blocks may survive: the threat model (DESIGN §1) leaves the boot drive out.
func destroyInPlace(path string) error {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), filepath.Base(path))
	defer f.Close()
	junk := make([]byte, MasterKeySize)
	rand.Read(junk)
	if _, err := f.WriteAt(junk, 0); err != nil {
		return err
	}
	return f.Sync()
}
