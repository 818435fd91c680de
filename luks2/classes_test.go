package luks2

import (
	"errors"
	"strings"
	"syscall"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

// The error classes a caller acts on: a drive that cannot be read is not a damaged
// header, a drive shorter than its header and an unsupported keyslot are not a wrong
// key.

// TestLoadIOError: reads that fail with EIO (a pulled drive) make Load return the I/O
// error, not ErrDamaged; a copy that reads fine still wins over one that does not.
func TestLoadIOError(t *testing.T) {
	dev, h, _, _ := formatMem(t, 4096)

	pulled := blockdev.NewFaulty(dev)
	pulled.Vanish()
	_, err := Load(pulled)
	if !errors.Is(err, blockdev.ErrGone) || errors.Is(err, ErrDamaged) || errors.Is(err, ErrNotLUKS) || !strings.Contains(err.Error(), "unreadable") {
		t.Fatalf("Load of a vanished drive: %v, want the I/O error and not ErrDamaged", err)
	}

	// Only the primary's JSON area fails: the secondary is used.
	f := blockdev.NewFaulty(dev)
	f.InjectError(binHeaderSize, 1, blockdev.FaultRead, syscall.EIO)
	got, err := Load(f)
	if err != nil {
		t.Fatalf("Load with the primary unreadable: %v", err)
	}
	if bad, why := got.NeedsRepair(); !bad || got.UUID() != h.UUID() || !strings.Contains(why.Error(), "input/output error") {
		t.Fatalf("primary unreadable: needs repair %v (%v)", bad, why)
	}

	// Both copies fail, one with EIO and one at its magic: still the I/O error.
	f = blockdev.NewFaulty(dev)
	f.InjectError(0, 1, blockdev.FaultRead, syscall.EIO)
	// The secondary, and every other offset where one is searched for, reads zeroes.
	if _, err := dev.WriteAt(make([]byte, DataOffset-HeaderSize), HeaderSize); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(f); !errors.Is(err, syscall.EIO) || errors.Is(err, ErrDamaged) {
		t.Fatalf("Load with both copies unreadable: %v", err)
	}
}

// truncatedCopy copies the first n bytes of dev to a memory device of n bytes.
func truncatedCopy(t *testing.T, dev *blockdev.Mem, n int64) *blockdev.Mem {
	t.Helper()
	short := blockdev.NewMem(n)
	if _, err := short.WriteAt(memBytes(t, dev, 0, n), 0); err != nil {
		t.Fatal(err)
	}
	return short
}

// TestKeyslotBeyondEnd: a drive truncated to 16 or 32 KiB keeps a loadable header but
// loses its keyslot area; unlocking says so (ErrTruncated), not ErrWrongKey, and
// derives nothing.
func TestKeyslotBeyondEnd(t *testing.T) {
	dev, _, _, pass := formatMem(t, 4096)
	for _, n := range []int64{HeaderSize, 2 * HeaderSize, 2*HeaderSize + 4096} {
		short := truncatedCopy(t, dev, n)
		h, err := Load(short)
		if err != nil {
			t.Fatalf("%d bytes: Load: %v", n, err)
		}
		derived := 0
		old := deriveHook
		deriveHook = func() { derived++ }
		_, _, err = h.Unlock(short, pass)
		deriveHook = old
		if !errors.Is(err, ErrTruncated) || errors.Is(err, ErrWrongKey) || !strings.Contains(err.Error(), "beyond the end") {
			t.Fatalf("%d bytes: Unlock: %v, want ErrTruncated", n, err)
		}
		if derived != 0 {
			t.Fatalf("%d bytes: %d derivations for a keyslot that is not there", n, derived)
		}
	}
}

// TestKeyslotReadError: a keyslot area that cannot be read makes Unlock return the
// read error, not ErrWrongKey, even when another slot refused the key.
func TestKeyslotReadError(t *testing.T) {
	dev, h, vk, pass := formatMem(t, 4096)
	other := newKey(t, 32)
	slot, err := h.AddKeyslot(dev, vk, other)
	if err != nil {
		t.Fatal(err)
	}
	ks := h.m.keyslots[slot]
	f := blockdev.NewFaulty(dev)
	f.InjectError(ks.Area.Offset, 1, blockdev.FaultRead, syscall.EIO)
	h, err = Load(f)
	if err != nil {
		t.Fatal(err)
	}
	// Slot 0 refuses the key, the other cannot be read: nothing is known.
	_, _, err = h.Unlock(f, other)
	if !errors.Is(err, syscall.EIO) || errors.Is(err, ErrWrongKey) {
		t.Fatalf("Unlock with the other slot unreadable: %v, want the I/O error", err)
	}
	// The key that slot 0 holds still opens it.
	if _, _, err := h.Unlock(f, pass); err != nil {
		t.Fatalf("Unlock through the readable slot: %v", err)
	}
}

// TestWrongKeyNamesSkipped: a slot that refuses the key and one outside the
// allow-list make ErrWrongKey, naming the skipped slot.
func TestWrongKeyNamesSkipped(t *testing.T) {
	dev, h, vk, _ := formatMem(t, 4096)
	if _, err := h.AddKeyslot(dev, vk, newKey(t, 32)); err != nil {
		t.Fatal(err)
	}
	rewrite(t, dev, func(r object) { r["keyslots"].(object)["1"].(object)["af"].(object)["stripes"] = jsonInt(1) })
	h, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = h.Unlock(dev, newKey(t, 32))
	if !errors.Is(err, ErrWrongKey) || !strings.Contains(err.Error(), "skipped: keyslot 1") {
		t.Fatalf("got %v, want ErrWrongKey naming the skipped slot 1", err)
	}
}
