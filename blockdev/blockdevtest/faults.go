package blockdevtest

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// FaultConfig describes a layer that wraps another device, for RunFaults.
type FaultConfig struct {
	// Wrap returns the layer under test over lower, which the layer owns from then on,
	// and registers its cleanup, which must accept a layer that the suite closed
	// already. lower is a blockdev.Faulty (over a Mem of Size bytes), sometimes under a
	// blockdev.Bounded; the layer may use any part of it.
	Wrap func(t *testing.T, lower blockdev.Device) blockdev.Device

	// Size is the size of the lower device; 0 means 1 MiB.
	Size int64

	// PassesTrim says that the layer offers Trim over a lower device that can trim
	// (blockcrypt only when its header allows discards). Over one that cannot, no layer
	// may offer it.
	PassesTrim bool

	// TimeoutBelow is the class that the layer gives to blockdev.ErrTimeout from the
	// device below it; nil means ErrTimeout itself. The NBD protocol has no error for a
	// timeout: the server answers EIO, which the client reports as ErrMedium.
	TimeoutBelow error
}

// boundLimit is the time limit of the timeout cases: long enough that a call that does
// not hang never reaches it on a loaded machine, short enough for a test.
const boundLimit = 300 * time.Millisecond

// RunFaults checks that the layer that cfg.Wrap builds passes on what the device below
// it does, each case over a fresh blockdev.Faulty:
//
//   - a medium error on a read, a write or a flush below fails the layer's call with an
//     error matching blockdev.ErrMedium;
//   - a vanished device below fails reads, writes and flushes with blockdev.ErrGone;
//   - a read-only device below makes the layer read-only (Caps) and refuse writes with
//     blockdev.ErrReadOnly;
//   - a device below that cannot trim makes the layer's Caps say no Trim, and Trim fail
//     with blockdev.ErrNotSupported; one that can trim makes the layer's Caps say Trim
//     exactly when cfg.PassesTrim;
//   - a call that hangs below a blockdev.Bound fails the layer's call with the class
//     cfg.TimeoutBelow; a call that hangs in the layer (its device below hangs) is
//     bounded by blockdev.Bound over the layer, which fails it with ErrTimeout and lets
//     its goroutine go once the hang is released;
//   - a write past the end fails with blockdev.ErrOutOfRange, and any call after Close
//     with blockdev.ErrClosed.
func RunFaults(t *testing.T, cfg FaultConfig) {
	if cfg.Wrap == nil {
		t.Fatal("blockdevtest: FaultConfig.Wrap is not set")
	}
	if cfg.Size == 0 {
		cfg.Size = 1 << 20
	}
	if cfg.TimeoutBelow == nil {
		cfg.TimeoutBelow = blockdev.ErrTimeout
	}
	f := &faults{cfg: cfg}
	t.Run("MediumRead", f.testMedium(blockdev.FaultRead, "ReadAt", readAt))
	t.Run("MediumWrite", f.testMedium(blockdev.FaultWrite, "WriteAt", writeAt))
	t.Run("MediumFlush", f.testMediumFlush)
	t.Run("Gone", f.testGone)
	t.Run("ReadOnly", f.testReadOnly)
	t.Run("Trim", f.testTrim)
	t.Run("TimeoutBelow", f.testTimeoutBelow)
	t.Run("TimeoutAbove", f.testTimeoutAbove)
	t.Run("OutOfRange", f.testOutOfRange)
	t.Run("Closed", f.testClosed)
}

type faults struct {
	cfg FaultConfig
}

// newFaulty returns a Faulty over lower, or over a fresh Mem when lower is nil. The
// layer that wraps it owns it.
func (f *faults) newFaulty(lower blockdev.Device) *blockdev.Faulty {
	if lower == nil {
		lower = blockdev.NewMem(f.cfg.Size)
	}
	return blockdev.NewFaulty(lower)
}

// wrap returns the layer over lower.
func (f *faults) wrap(t *testing.T, lower blockdev.Device) blockdev.Device {
	t.Helper()
	dev := f.cfg.Wrap(t, lower)
	if dev == nil {
		t.Fatal("FaultConfig.Wrap returned nil")
	}
	return dev
}

// wantClass fails the test unless err matches class.
func wantClass(t *testing.T, what string, err, class error) {
	t.Helper()
	if !errors.Is(err, class) {
		t.Errorf("%s: %v, want an error matching %v", what, err, class)
	}
}

func readAt(dev blockdev.Device, off, n int64) error {
	_, err := dev.ReadAt(make([]byte, n), off)
	return err
}

func writeAt(dev blockdev.Device, off, n int64) error {
	_, err := dev.WriteAt(make([]byte, n), off)
	return err
}

// testMedium returns the test of call (named what) over a medium error on the calls of
// kind op below.
func (f *faults) testMedium(op blockdev.FaultOp, what string, call func(dev blockdev.Device, off, n int64) error) func(*testing.T) {
	return func(t *testing.T) {
		lower := f.newFaulty(nil)
		dev := f.wrap(t, lower)
		remove := lower.InjectError(0, f.cfg.Size, op, nil)
		wantClass(t, what+" over a medium error", call(dev, 8192, 4096), blockdev.ErrMedium)
		remove()
		if err := call(dev, 8192, 4096); err != nil {
			t.Errorf("%s once the medium error is gone: %v", what, err)
		}
	}
}

func (f *faults) testMediumFlush(t *testing.T) {
	lower := f.newFaulty(nil)
	dev := f.wrap(t, lower)
	if err := writeAt(dev, 0, 4096); err != nil {
		t.Fatal(err)
	}
	remove := lower.FailFlush(nil)
	wantClass(t, "Flush over a failing flush", dev.Flush(), blockdev.ErrMedium)
	remove()
	if err := dev.Flush(); err != nil {
		t.Errorf("Flush once the flush fault is gone: %v", err)
	}
}

func (f *faults) testGone(t *testing.T) {
	lower := f.newFaulty(nil)
	dev := f.wrap(t, lower)
	lower.Vanish()
	wantClass(t, "ReadAt over a vanished device", readAt(dev, 0, 4096), blockdev.ErrGone)
	wantClass(t, "WriteAt over a vanished device", writeAt(dev, 4096, 4096), blockdev.ErrGone)
	wantClass(t, "Flush over a vanished device", dev.Flush(), blockdev.ErrGone)
}

// readOnly is a device that refuses every change, as a drive opened read-only.
type readOnly struct{ blockdev.Device }

func (d readOnly) WriteAt(p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("read-only test device: %w", blockdev.ErrReadOnly)
}

func (d readOnly) Caps() blockdev.Caps {
	return blockdev.Caps{ReadOnly: true, BlockSize: blockdev.PreferredBlockSize(d.Device)}
}

func (f *faults) testReadOnly(t *testing.T) {
	dev := f.wrap(t, f.newFaulty(readOnly{blockdev.NewMem(f.cfg.Size)}))
	if c := blockdev.CapsOf(dev); !c.ReadOnly {
		t.Errorf("Caps %+v over a read-only device are not ReadOnly", c)
	}
	wantClass(t, "WriteAt over a read-only device", writeAt(dev, 4096, 4096), blockdev.ErrReadOnly)
	if err := readAt(dev, 0, 4096); err != nil {
		t.Errorf("ReadAt over a read-only device: %v", err)
	}
}

// noTrim is a device that cannot trim: only the methods of blockdev.Device.
type noTrim struct{ blockdev.Device }

func (f *faults) testTrim(t *testing.T) {
	dev := f.wrap(t, f.newFaulty(noTrim{blockdev.NewMem(f.cfg.Size)}))
	if c := blockdev.CapsOf(dev); c.Trim {
		t.Errorf("Caps %+v over a device that cannot trim say Trim", c)
	}
	wantClass(t, "Trim over a device that cannot trim", blockdev.Trim(dev, 0, 65536), blockdev.ErrNotSupported)

	dev = f.wrap(t, f.newFaulty(nil))
	if c := blockdev.CapsOf(dev); c.Trim != f.cfg.PassesTrim {
		t.Errorf("Caps %+v over a device that can trim: Trim is %v, want %v", c, c.Trim, f.cfg.PassesTrim)
	}
	if err := blockdev.Trim(dev, 0, 65536); f.cfg.PassesTrim && err != nil {
		t.Errorf("Trim over a device that can trim: %v", err)
	}
}

// waitHung waits until a call is blocked in the hung lower.
func waitHung(t *testing.T, lower *blockdev.Faulty) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for lower.Stats().Hung == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no call reached the hung device within 10 s")
		}
		time.Sleep(time.Millisecond)
	}
}

// waitUnstuck waits until b has no call left running below.
func waitUnstuck(t *testing.T, b *blockdev.Bounded) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for b.Stuck() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d calls still run below the bound 10 s after the hang was released", b.Stuck())
		}
		time.Sleep(time.Millisecond)
	}
}

// timed runs fn and fails the test unless it returned within the bound and a margin
// that a loaded machine can meet.
func timed(t *testing.T, what string, fn func() error) error {
	t.Helper()
	start := time.Now()
	err := fn()
	if d := time.Since(start); d > boundLimit+5*time.Second {
		t.Errorf("%s returned after %v, with a bound of %v", what, d, boundLimit)
	}
	return err
}

func (f *faults) testTimeoutBelow(t *testing.T) {
	lower := f.newFaulty(nil)
	b := blockdev.Bound(lower, boundLimit)
	dev := f.wrap(t, b)
	release := lower.Hang()
	defer release()
	err := timed(t, "ReadAt over a hung device under a bound", func() error { return readAt(dev, 0, 4096) })
	wantClass(t, "ReadAt over a hung device under a bound", err, f.cfg.TimeoutBelow)
	release()
	waitUnstuck(t, b)
	if err := readAt(dev, 0, 4096); err != nil {
		t.Errorf("ReadAt once the hang is released: %v", err)
	}
}

func (f *faults) testTimeoutAbove(t *testing.T) {
	lower := f.newFaulty(nil)
	b := blockdev.Bound(f.wrap(t, lower), boundLimit)
	release := lower.Hang()
	defer release()
	for _, c := range []struct {
		what string
		call func() error
	}{
		{"ReadAt", func() error { return readAt(b, 0, 4096) }},
		{"WriteAt", func() error { return writeAt(b, 4096, 4096) }},
		{"Flush", b.Flush},
	} {
		err := timed(t, c.what+" through a bound over a hung layer", c.call)
		wantClass(t, c.what+" through a bound over a hung layer", err, blockdev.ErrTimeout)
	}
	waitHung(t, lower)
	release()
	waitUnstuck(t, b)
	if err := readAt(b, 0, 4096); err != nil {
		t.Errorf("ReadAt once the hang is released: %v", err)
	}
}

func (f *faults) testOutOfRange(t *testing.T) {
	dev := f.wrap(t, f.newFaulty(nil))
	wantClass(t, "WriteAt past the end", writeAt(dev, dev.Size()-100, 4096), blockdev.ErrOutOfRange)
	wantClass(t, "ReadAt at a negative offset", readAt(dev, -4096, 4096), blockdev.ErrOutOfRange)
}

func (f *faults) testClosed(t *testing.T) {
	dev := f.wrap(t, f.newFaulty(nil))
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	wantClass(t, "ReadAt after Close", readAt(dev, 0, 4096), blockdev.ErrClosed)
	wantClass(t, "WriteAt after Close", writeAt(dev, 0, 4096), blockdev.ErrClosed)
}
