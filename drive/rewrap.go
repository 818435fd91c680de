package drive

import (
	"errors"
	"fmt"
	"slices"

	"github.com/atrest/atrest/luks2"
)

// Rewrap phases: where a drive stands in a rewrap, in order (the words the rotation
// journal records, docs/luks2-profile.md).
const (
	PhasePending = "pending" // untouched: the old key opens it
	PhaseAdding  = "adding"  // old slot known; the new slot may or may not be written
	PhaseWiping  = "wiping"  // new slot verified; the old slot may or may not be wiped
	PhaseDone    = "done"    // only the new key opens it; token updated
)

// Rewrap steps, each reported to RewrapOptions.Record once what it names is durable on
// the drive.
const (
	StepStarted  = "drive-start"    // old slot found (phase adding)
	StepAdded    = "drive-added"    // new keyslot written
	StepVerified = "drive-verified" // new key opens the new slot (phase wiping)
	StepWiped    = "drive-wiped"    // old keyslot wiped and removed
	StepDone     = "drive-done"     // token names the new slot and key (phase done)
)

// RewrapState is a drive's progress in a rewrap, as a journal keeps it.
type RewrapState struct {
	Phase   string
	OldSlot int // -1 until known
	NewSlot int // -1 until known
}

// RewrapOptions configure Rewrap.
type RewrapOptions struct {
	// Old is the master key the drive's keyslot is wrapped by now; New the one it moves
	// to.
	Old, New Key
	// Token is the atrest token to write should the drive have lost its own (its
	// keyslots and key id are set by Rewrap).
	Token luks2.AtrestToken
	// Record is called after each step with the drive's state then. It journals the
	// state when the phase or a slot changed, before anything else is written, so that
	// a crash leaves a journal that says which key opens the drive; an error stops the
	// rewrap.
	Record func(step string, s RewrapState) error
}

// Rewrap moves the keyslot of the drive dev (at path, named in errors) from the old
// master key to the new one, from wherever s says it stands to done: find the slot the
// old key opens, add a slot wrapping the same data key with the new key (unless an
// earlier run did), verify it from a fresh read of the header, wipe the old slot, and
// point the token at the new slot and key. Each step is durable before Record hears of
// it, and every state Record is given leaves the drive openable by a key it names (the
// old one before wiping, the new one from verified on), so a rerun from the last state
// recorded finishes the rewrap after a crash anywhere. The data key does not change: a
// drive being served stays open.
//
// Rewrap writes the header (and repairs a damaged copy): the caller holds the custody
// lock. It opens nothing: dev may be a shared open of a drive the daemon serves.
func Rewrap(dev luks2.Device, path string, s RewrapState, o RewrapOptions) error {
	if s.Phase == PhaseDone {
		return nil
	}
	h, err := loadHeader(dev, path, true)
	if err != nil {
		return err
	}
	if s.Phase == PhasePending {
		vk, slot, err := h.UnlockAny(dev, atrestSlots(h), o.Old.Key)
		if errors.Is(err, luks2.ErrWrongKey) {
			return fmt.Errorf("%s: the current master key does not open drive %s: %w", path, h.UUID(), err)
		}
		if err != nil {
			return fmt.Errorf("%s: drive %s: %w", path, h.UUID(), err)
		}
		clear(vk)
		s = RewrapState{Phase: PhaseAdding, OldSlot: slot, NewSlot: -1}
		if err := o.Record(StepStarted, s); err != nil {
			return err
		}
	}
	if s.Phase == PhaseAdding {
		if err := addSlot(dev, path, h, &s, o); err != nil {
			return err
		}
	}
	if s.Phase != PhaseWiping {
		return fmt.Errorf("drive %s: rewrap phase %q", h.UUID(), s.Phase)
	}
	if slices.ContainsFunc(h.Keyslots(), func(ks luks2.Keyslot) bool { return ks.ID == s.OldSlot }) && s.OldSlot != s.NewSlot {
		if err := h.WipeKeyslot(dev, s.OldSlot); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if err := o.Record(StepWiped, s); err != nil {
			return err
		}
	}
	t, err := h.AtrestToken()
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if t == nil {
		t = &o.Token
	}
	t.Keyslots, t.MasterKeyID = []int{s.NewSlot}, o.New.ID
	if err := h.SetAtrestToken(dev, t); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	s.Phase = PhaseDone
	return o.Record(StepDone, s)
}

// addSlot takes a drive from phase adding to wiping: a new keyslot for the new key,
// written unless a previous run wrote it, then verified.
func addSlot(dev luks2.Device, path string, h *luks2.Header, s *RewrapState, o RewrapOptions) error {
	var others []int
	for _, slot := range atrestSlots(h) {
		if slot != s.OldSlot {
			others = append(others, slot)
		}
	}
	vk, slot, err := h.UnlockAny(dev, others, o.New.Key)
	if err != nil {
		// Not written yet, unless a slot could not be read; one outside the allow-list
		// (an adopted drive's old passphrase) is not atrest's.
		if !errors.Is(err, luks2.ErrWrongKey) && !errors.Is(err, luks2.ErrUnsupported) {
			return fmt.Errorf("%s: %w", path, err)
		}
		if vk, err = h.UnlockSlot(dev, s.OldSlot, o.Old.Key); err != nil {
			return fmt.Errorf("%s: keyslot %d of drive %s: %w", path, s.OldSlot, h.UUID(), err)
		}
		if slot, err = h.AddKeyslot(dev, vk, o.New.Key); err != nil {
			clear(vk)
			return fmt.Errorf("%s: %w", path, err)
		}
		if err := o.Record(StepAdded, *s); err != nil {
			clear(vk)
			return err
		}
	}
	err = verifySlot(dev, path, slot, o.New.Key, vk)
	clear(vk)
	if err != nil {
		return err
	}
	*s = RewrapState{Phase: PhaseWiping, OldSlot: s.OldSlot, NewSlot: slot}
	return o.Record(StepVerified, *s)
}
