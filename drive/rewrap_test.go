package drive

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/atrest/atrest/luks2"
)

var errStop = errors.New("stop")

// rewrapTo runs Rewrap from s, journalling as a rotation does, until Record is called for
// the stop-th time (counting from 0), where it fails as a crash before the journal write
// would. It returns the last state recorded and whether it stopped.
func rewrapTo(t *testing.T, img string, s RewrapState, old, new Key, stop int) (RewrapState, []string, bool) {
	t.Helper()
	var steps []string
	n := 0
	dev := openRW(t, img)
	defer dev.Close()
	err := Rewrap(dev, img, s, RewrapOptions{Old: old, New: new, Token: token("vol0"), Record: func(step string, got RewrapState) error {
		if n == stop {
			return errStop
		}
		n++
		steps = append(steps, step)
		s = got
		return nil
	}})
	if errors.Is(err, errStop) {
		return s, steps, true
	}
	if err != nil {
		t.Fatalf("rewrap from %+v: %v", s, err)
	}
	return s, steps, false
}

// checkRewrapped: only the new key opens the drive, on one keyslot the token names with
// the new key's id, and the data is unchanged.
func checkRewrapped(t *testing.T, img string, old, new Key, data []byte) {
	t.Helper()
	if got := readThrough(t, img, new, len(data), 12345); !bytes.Equal(got, data) {
		t.Fatal("data changed")
	}
	dev := openRW(t, img)
	h, err := luks2.Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := h.Unlock(dev, old.Key); !errors.Is(err, luks2.ErrWrongKey) {
		t.Fatalf("old key: %v", err)
	}
	tok, _ := h.AtrestToken()
	if len(h.Keyslots()) != 1 || tok.MasterKeyID != new.ID || !slices.Equal(tok.Keyslots, []int{h.Keyslots()[0].ID}) {
		t.Fatalf("%d keyslots, token %+v", len(h.Keyslots()), tok)
	}
}

// TestRewrap: the steps in order, each with the state it leaves; a rerun from done does
// nothing.
func TestRewrap(t *testing.T) {
	old, new := newKey("mk-0123456789abcdef"), newKey("mk-1111111111111111")
	img, _ := format(t, old, FormatOptions{})
	data := randomBytes(10000)
	writeThrough(t, img, old, data, 12345)
	s, steps, stopped := rewrapTo(t, img, RewrapState{Phase: PhasePending, OldSlot: -1, NewSlot: -1}, old, new, -1)
	if stopped || fmt.Sprint(steps) != fmt.Sprint([]string{StepStarted, StepAdded, StepVerified, StepWiped, StepDone}) {
		t.Fatalf("steps %v", steps)
	}
	if s.Phase != PhaseDone || s.OldSlot != 0 || s.NewSlot != 1 {
		t.Fatalf("final state %+v", s)
	}
	checkRewrapped(t, img, old, new, data)
	if _, steps, _ := rewrapTo(t, img, s, old, new, -1); len(steps) != 0 {
		t.Fatalf("a rerun from done: %v", steps)
	}
}

// TestRewrapStopAtEveryStep stops the rewrap at every step, before its state is
// journalled (the Record error: a crash between the drive write and the journal
// write), checks that a key the last recorded state names opens the drive, and reruns
// from that state to done.
func TestRewrapStopAtEveryStep(t *testing.T) {
	old, new := newKey("mk-0123456789abcdef"), newKey("mk-1111111111111111")
	for stop := 0; ; stop++ {
		img, _ := format(t, old, FormatOptions{SectorSize: []int{4096, 512}[stop%2]})
		data := randomBytes(10000)
		writeThrough(t, img, old, data, 12345)
		s, _, stopped := rewrapTo(t, img, RewrapState{Phase: PhasePending, OldSlot: -1, NewSlot: -1}, old, new, stop)
		if !stopped {
			t.Logf("stopped at each of %d steps", stop)
			return
		}
		opener := old
		if s.Phase == PhaseWiping || s.Phase == PhaseDone {
			opener = new
		}
		if got := readThrough(t, img, opener, len(data), 12345); !bytes.Equal(got, data) {
			t.Fatalf("stop %d: the key state %+v names does not read the data", stop, s)
		}
		s, _, stopped = rewrapTo(t, img, s, old, new, -1)
		if stopped || s.Phase != PhaseDone {
			t.Fatalf("stop %d: rerun ended in %+v", stop, s)
		}
		checkRewrapped(t, img, old, new, data)
	}
}
