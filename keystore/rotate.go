package keystore

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/internal/securefile"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/registry"
)

// Rotation steps reported to RotateOptions.Step, in order; the drive steps repeat for
// each drive. Every step is reported after what it names is durable, so a crash right
// after any of them is a crash at a step boundary (the crash tests stop the process at
// each).
const (
	StepResume         = "resume"            // a journal was found: resuming
	StepNextKeyWritten = "next-key-written"  // master.key.next is durable
	StepJournal        = "journal-recorded"  // the journal names the new key
	StepDriveStart     = drive.StepStarted   // old slot recorded (state adding)
	StepDriveAdded     = drive.StepAdded     // new keyslot written
	StepDriveVerified  = drive.StepVerified  // new key opens it (state wiping)
	StepDriveWiped     = drive.StepWiped     // old keyslot wiped and removed
	StepDriveDone      = drive.StepDone      // token updated (state done)
	StepDriveAbsent    = "drive-absent"      // missing, left to the old key (Force)
	StepCommit         = "commit-recorded"   // every drive done: phase commit
	StepOldKeyDestroy  = "old-key-destroyed" // master.key overwritten in place
	StepKeyReplaced    = "master-key-replaced"
	StepOutcome        = "outcome-recorded" // Finish returned
	StepFinished       = "finished"         // journal cleared, last rotation recorded
)

// RotateDrive is a drive a rotation rewraps, as the caller's registry knows it.
type RotateDrive struct {
	UUID string
	// Path is where the drive is now (its last seen path).
	Path string
	// Volume names the drive's volume in messages; with VolumeUUID, MemberIndex and
	// MemberCount it rebuilds the atrest token of a drive that lost its own.
	Volume      string
	VolumeUUID  string
	MemberIndex int
	MemberCount int
}

// Step is a rotation progress report.
type Step struct {
	Name  string
	Drive *RotateDrive // drive steps only
	Index int          // drive steps: 1-based position among the drives
	Total int          // drive steps: number of drives in the rotation
}

// RotateOptions configure Rotate.
type RotateOptions struct {
	// Drives are the drives to rewrap: every active drive of the registry. A new
	// rotation records them in its journal; a resumed one looks the journal's drives up
	// among them by UUID (those still to rewrap must be there).
	Drives []RotateDrive
	// Force rotates even if drives are missing: they stay locked to the old master key
	// for good (RotateOutcome.Stale).
	Force bool
	// Step, if set, is called after each step (progress; test crash points).
	Step func(Step)
	// Finish, if set, records the outcome where the drives are kept (the registry: the
	// new key id of the drives rewrapped, the stale ones). It is called once every drive
	// is done and master.key replaced, before the journal is cleared, so a crash in
	// between is finished by a rerun, which calls Finish again with the same outcome:
	// it must be idempotent. An error leaves the journal for a rerun.
	Finish func(RotateOutcome) error
}

// RotateOutcome is what a rotation did.
type RotateOutcome struct {
	OldKeyID, NewKeyID string
	// Rewrapped are the drives (UUIDs) the new key opens now, in journal order.
	Rewrapped []string
	// Stale are the drives left locked to the old key (missing under Force).
	Stale []string
	// Resumed is true when the rotation was found in the journal.
	Resumed bool
	// Time is the rotation time, recorded as the last rotation.
	Time time.Time
}

// MissingError lists the missing drives that made Rotate refuse. It matches
// ErrDriveMissing.
type MissingError struct {
	Drives []RotateDrive
	// Rewrapping is true for a drive whose rewrap had started: Force does not skip it,
	// it must come back.
	Rewrapping bool
}

func (e *MissingError) Error() string {
	var s []string
	for _, d := range e.Drives {
		s = append(s, fmt.Sprintf("%s (volume %s, last seen at %s)", d.UUID, d.Volume, d.Path))
	}
	what := "missing"
	if e.Rewrapping {
		what = "missing in the middle of its rewrap"
	}
	return fmt.Sprintf("%d drive(s) %s: %s", len(e.Drives), what, strings.Join(s, ", "))
}

func (e *MissingError) Unwrap() error { return ErrDriveMissing }

// Rotate replaces the master key (docs/luks2-profile.md §3): it writes the new key to
// master.key.next and records the journal; for each drive it adds a keyslot wrapping
// the drive's (unchanged) data key with the new key, verifies it, wipes the old keyslot
// and updates the token (drive.Rewrap); then it replaces master.key atomically,
// destroys the old key, has the caller record the outcome (Finish), records the
// rotation time and clears the journal. Each step is durable before the next starts,
// and the journal says which key opens which drive, so a crash anywhere leaves every
// drive openable (Keys gives both keys meanwhile) and a rerun finishes the rotation. A
// rotation found in the journal is resumed.
//
// Drives are opened shared: the daemon may serve them meanwhile, with their data keys,
// which do not change.
func (l *Locked) Rotate(ctx context.Context, o RotateOptions) (*RotateOutcome, error) {
	if l.lockF == nil {
		return nil, errClosed
	}
	if l.V1() {
		return nil, fmt.Errorf("%s: %w", filepath.Join(l.dir, StateFile), ErrNotMigrated)
	}
	step := func(s Step) {
		if o.Step != nil {
			o.Step(s)
		}
	}
	resumed := l.state.Rotation != nil
	if resumed {
		step(Step{Name: StepResume})
	} else if err := l.startRotation(o, step); err != nil {
		return nil, err
	}
	r := l.state.Rotation
	if r.Phase == PhaseDrives {
		oldKey, newKey, err := l.rotationKeys()
		if err != nil {
			return nil, err
		}
		defer drive.ZeroKeys([]drive.Key{oldKey, newKey})
		drives := make(map[string]RotateDrive, len(o.Drives))
		for _, d := range o.Drives {
			drives[d.UUID] = d
		}
		for i := range r.Drives {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("key rotation interrupted: %w", err)
			}
			if err := l.rotateDrive(i, drives, oldKey, newKey, o, step); err != nil {
				return nil, err
			}
		}
		r.Phase = PhaseCommit
		if err := l.save(); err != nil {
			return nil, err
		}
		step(Step{Name: StepCommit})
	}
	if err := l.replaceMasterKey(step); err != nil {
		return nil, err
	}
	out := RotateOutcome{OldKeyID: r.OldKeyID, NewKeyID: r.NewKey.ID, Resumed: resumed, Time: l.now()}
	for _, rd := range r.Drives {
		if rd.State == RotDone {
			out.Rewrapped = append(out.Rewrapped, rd.UUID)
		} else {
			out.Stale = append(out.Stale, rd.UUID)
		}
	}
	if o.Finish != nil {
		if err := o.Finish(out); err != nil {
			return nil, fmt.Errorf("record the outcome of the key rotation: %w", err)
		}
	}
	step(Step{Name: StepOutcome})
	l.state.MasterKey = r.NewKey
	l.state.LastRotation = &out.Time
	l.state.Rotation = nil
	if err := l.save(); err != nil {
		return nil, err
	}
	step(Step{Name: StepFinished})
	return &out, nil
}

// startRotation checks that the drives are there, writes the new key and records the
// journal.
func (l *Locked) startRotation(o RotateOptions, step func(Step)) error {
	var missing []RotateDrive
	r := &Rotation{Started: l.now(), OldKeyID: l.state.MasterKey.ID, Phase: PhaseDrives, Drives: []RotationDrive{}}
	seen := map[string]bool{}
	for _, d := range o.Drives {
		if !validUUID(d.UUID) || seen[d.UUID] {
			return fmt.Errorf("rotate drive %q: not a UUID, or given twice", d.UUID)
		}
		seen[d.UUID] = true
		rd := RotationDrive{UUID: d.UUID, State: RotPending, OldSlot: -1, NewSlot: -1}
		if err := drive.Probe(d.Path, d.UUID); err != nil {
			if !errors.Is(err, drive.ErrMissing) {
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
	r.NewKey = KeyInfo{ID: KeyID(newKey), Created: l.now()}
	// The key is durable before the journal names it, so that a journal never names a
	// key that is lost. A crash in between leaves a stray next key that the next start
	// overwrites.
	if err := securefile.WriteAtomic(l.dir, NextKeyFile, newKey); err != nil {
		return err
	}
	step(Step{Name: StepNextKeyWritten})
	l.state.Rotation = r
	if err := l.save(); err != nil {
		l.state.Rotation = nil
		return err
	}
	step(Step{Name: StepJournal})
	for i := range missing {
		step(Step{Name: StepDriveAbsent, Drive: &missing[i]})
	}
	return nil
}

// rotationKeys reads the old and the new key of the journal, checking each is the key
// the journal names.
func (l *Locked) rotationKeys() (oldKey, newKey drive.Key, err error) {
	r := l.state.Rotation
	read := func(name, want string) (drive.Key, error) {
		key, err := readKey(filepath.Join(l.dir, name))
		if err != nil {
			return drive.Key{}, err
		}
		if id := KeyID(key); id != want {
			clear(key)
			return drive.Key{}, fmt.Errorf("%s holds key %s, the journal expects %s: %w", name, id, want, ErrCorrupt)
		}
		return drive.Key{ID: want, Key: key}, nil
	}
	if oldKey, err = read(MasterKeyFile, r.OldKeyID); err != nil {
		return oldKey, newKey, err
	}
	if newKey, err = read(NextKeyFile, r.NewKey.ID); err != nil {
		clear(oldKey.Key)
		return oldKey, newKey, fmt.Errorf("the rotation journal needs the new key: %w", err)
	}
	return oldKey, newKey, nil
}

// rotateDrive moves drive i of the journal on from wherever it stands to done.
func (l *Locked) rotateDrive(i int, drives map[string]RotateDrive, oldKey, newKey drive.Key, o RotateOptions, step func(Step)) error {
	r := l.state.Rotation
	rd := &r.Drives[i]
	if rd.State == RotDone || rd.State == RotAbsent {
		return nil
	}
	d, ok := drives[rd.UUID]
	if !ok {
		return fmt.Errorf("the rotation journal names drive %s (%s), which is not among the drives given", rd.UUID, rd.State)
	}
	at := Step{Drive: &d, Index: i + 1, Total: len(r.Drives)}
	if err := drive.Probe(d.Path, d.UUID); err != nil {
		if errors.Is(err, drive.ErrMissing) && rd.State == RotPending && o.Force {
			rd.State = RotAbsent
			if err := l.save(); err != nil {
				return err
			}
			at.Name = StepDriveAbsent
			step(at)
			return nil
		}
		if errors.Is(err, drive.ErrMissing) {
			return &MissingError{Drives: []RotateDrive{d}, Rewrapping: rd.State != RotPending}
		}
		return err
	}
	dev, err := drive.Open(d.Path, drive.OpenOptions{})
	if err != nil {
		return err
	}
	defer dev.Close()
	return drive.Rewrap(dev, d.Path, drive.RewrapState{Phase: rd.State, OldSlot: rd.OldSlot, NewSlot: rd.NewSlot}, drive.RewrapOptions{
		Old: oldKey, New: newKey,
		Token: luks2.AtrestToken{
			ClusterUUID: l.state.ClusterUUID, Volume: d.Volume, VolumeUUID: d.VolumeUUID,
			MemberIndex: d.MemberIndex, MemberCount: d.MemberCount,
		},
		Record: func(name string, s drive.RewrapState) error {
			if s.Phase != rd.State || s.OldSlot != rd.OldSlot || s.NewSlot != rd.NewSlot {
				rd.State, rd.OldSlot, rd.NewSlot = s.Phase, s.OldSlot, s.NewSlot
				if err := l.save(); err != nil {
					return err
				}
			}
			at.Name = name
			step(at)
			return nil
		},
	})
}

// replaceMasterKey makes the new key the master key: the old key is overwritten in
// place and flushed (while master.key.next still holds the new one), then
// master.key.next is renamed over master.key and the directory flushed. Rerunnable: each
// part checks whether it already happened.
func (l *Locked) replaceMasterKey(step func(Step)) error {
	r := l.state.Rotation
	next, cur := filepath.Join(l.dir, NextKeyFile), filepath.Join(l.dir, MasterKeyFile)
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
	if err := securefile.SyncDir(l.dir); err != nil {
		return err
	}
	step(Step{Name: StepKeyReplaced})
	return nil
}

// destroyInPlace overwrites a key file's bytes with random ones and flushes them. On a
// journaling or copy-on-write file system, or a flash drive, older copies of the blocks
// may survive: the threat model (docs/design.md) leaves the boot drive out.
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

// RotateDrives lists the drives a rotation rewraps, as RotateOptions.Drives takes them:
// the active drives of the registry, with their volumes.
func RotateDrives(r *registry.Registry) []RotateDrive {
	var out []RotateDrive
	for _, d := range r.Drives {
		if d.State != registry.DriveActive {
			continue
		}
		rd := RotateDrive{UUID: d.UUID, Path: d.Path, MemberIndex: d.MemberIndex}
		if v := r.VolumeByUUID(d.VolumeUUID); v != nil {
			rd.Volume, rd.VolumeUUID, rd.MemberCount = v.Name, v.UUID, len(v.Members)
		}
		out = append(out, rd)
	}
	return out
}

// Record records the outcome of a rotation in the registry (for RotateOptions.Finish,
// then commit): the drives rewrapped get the new key id, the ones left to the old key
// become stale. Recording the same outcome again changes nothing.
func (o RotateOutcome) Record(r *registry.Registry) error {
	for _, id := range o.Rewrapped {
		if err := r.SetKeyID(id, o.NewKeyID); err != nil {
			return err
		}
	}
	for _, id := range o.Stale {
		if err := r.MarkStale(id); err != nil {
			return err
		}
	}
	return nil
}
