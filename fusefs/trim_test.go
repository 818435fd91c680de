package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/atrest/atrest/blockdev"
	"golang.org/x/sys/unix"
)

// trimProbe is a probe that can trim, and records its trims.
type trimProbe struct {
	*probe
	mu    sync.Mutex
	trims []zeroCall
}

var _ blockdev.Trimmer = (*trimProbe)(nil)

func (p *trimProbe) Trim(off, n int64) error {
	p.mu.Lock()
	p.trims = append(p.trims, zeroCall{off: off, n: n})
	p.mu.Unlock()
	return nil
}

func (p *trimProbe) takeTrims() []zeroCall {
	p.mu.Lock()
	defer p.mu.Unlock()
	t := p.trims
	p.trims = nil
	return t
}

// TestTrimHoles: a punched hole reaches the Device as Trim exactly while TrimHoles says
// so, and as an unmapping zeroing otherwise; on a Device that does not trim, TrimHoles
// is not asked.
func TestTrimHoles(t *testing.T) {
	vol := &trimProbe{probe: newProbe(1 << 20)}
	vol.slowZero = true // like an encrypted device
	var asked atomic.Int32
	var trim atomic.Bool
	s := mount(t, Options{TrimHoles: func(file string) bool {
		if file != "vol" {
			t.Errorf("TrimHoles asked about %q", file)
		}
		asked.Add(1)
		return trim.Load()
	}}, File{"vol", vol})
	f := openT(t, s.Path("vol"), os.O_RDWR)
	punch := func() error {
		return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 8192, 4096)
	}

	if err := punch(); !errors.Is(err, syscall.EOPNOTSUPP) {
		t.Errorf("punch hole, not a discard, slow zeroing: %v, want EOPNOTSUPP", err)
	}
	if z, tr := vol.takeZeroes(), vol.takeTrims(); len(z) != 1 || len(tr) != 0 {
		t.Errorf("punch hole, not a discard: zeroings %v, trims %v; want one zeroing", z, tr)
	}
	trim.Store(true)
	if err := punch(); err != nil {
		t.Errorf("punch hole as a discard: %v", err)
	}
	if z, tr := vol.takeZeroes(), vol.takeTrims(); len(z) != 0 || fmt.Sprint(tr) != fmt.Sprint([]zeroCall{{off: 8192, n: 4096}}) {
		t.Errorf("punch hole as a discard: zeroings %v, trims %v; want one trim of [8192, +4096)", z, tr)
	}
	if asked.Load() != 2 {
		t.Errorf("TrimHoles asked %d times, want 2", asked.Load())
	}

	other := newProbe(1 << 20) // no Trim
	s2 := mount(t, Options{TrimHoles: func(string) bool { t.Error("TrimHoles asked for a device that does not trim"); return true }}, File{"vol", other})
	f2 := openT(t, s2.Path("vol"), os.O_RDWR)
	if err := unix.Fallocate(int(f2.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); !errors.Is(err, syscall.EOPNOTSUPP) {
		t.Errorf("punch hole on a device that does not trim: %v, want EOPNOTSUPP", err)
	}
	if z := other.takeZeroes(); len(z) != 0 {
		t.Errorf("punch hole on a device that does not trim zeroed %v", z)
	}
}

// TestRefuseZeroRange: while the function runs, ZERO_RANGE is refused without reaching
// the Device and writes of zeroes inside the window are dropped; other writes go
// through; afterwards everything is as before.
func TestRefuseZeroRange(t *testing.T) {
	vol := newProbe(1 << 20)
	fill := bytes.Repeat([]byte{0x5A}, 1<<20)
	if _, err := vol.Device.WriteAt(fill, 0); err != nil {
		t.Fatal(err)
	}
	s := mount(t, Options{}, File{"vol", vol})
	f := openT(t, s.Path("vol"), os.O_RDWR)
	zero := make([]byte, 4096)
	data := bytes.Repeat([]byte{0xC3}, 4096)
	read := func(off int64) []byte {
		b := make([]byte, 4096)
		if _, err := vol.Device.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		return b
	}

	err := s.RefuseZeroRange("vol", 0, 8192, func() error {
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); !errors.Is(err, syscall.EOPNOTSUPP) {
			t.Errorf("zero range while refused: %v, want EOPNOTSUPP", err)
		}
		if z := vol.takeZeroes(); len(z) != 0 {
			t.Errorf("a refused zero range reached the device: %v", z)
		}
		for _, w := range []struct {
			b   []byte
			off int64
		}{{zero, 0}, {data, 4096}, {zero, 65536}} {
			if _, err := f.WriteAt(w.b, w.off); err != nil {
				t.Errorf("write at %d while refused: %v", w.off, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(0), fill[:4096]) {
		t.Error("a write of zeroes inside the window reached the device")
	}
	if !bytes.Equal(read(4096), data) {
		t.Error("a write of data inside the window was dropped")
	}
	if !bytes.Equal(read(65536), zero) {
		t.Error("a write of zeroes outside the window was dropped")
	}
	// Afterwards: zero range and zero writes work again.
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); err != nil {
		t.Errorf("zero range after the window: %v", err)
	}
	if !bytes.Equal(read(0), zero) {
		t.Error("zero range after the window did not zero")
	}
	if err := s.RefuseZeroRange("nope", 0, 1, func() error { return nil }); err == nil {
		t.Error("RefuseZeroRange of a missing file succeeded")
	}
}
