package blockdev_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// faultyModel drives a Faulty over a Mem and keeps two models: what reads must return
// (cached) and what must survive a power cut (durable).
type faultyModel struct {
	t               *testing.T
	f               *blockdev.Faulty
	cached, durable []byte
	rng             *rand.Rand
}

func newFaultyModel(t *testing.T, size int64) *faultyModel {
	return &faultyModel{
		t:       t,
		f:       blockdev.NewFaulty(blockdev.NewMem(size)),
		cached:  make([]byte, size),
		durable: make([]byte, size),
		rng:     rand.New(rand.NewPCG(3, 4)),
	}
}

func (m *faultyModel) randomRange() (off, n int64) {
	size := int64(len(m.cached))
	n = 1 + m.rng.Int64N(20000)
	off = m.rng.Int64N(size - n)
	return off, n
}

func (m *faultyModel) random(n int64) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(m.rng.Uint32())
	}
	return p
}

// step makes one random change or flush and updates the models.
func (m *faultyModel) step() {
	m.t.Helper()
	off, n := m.randomRange()
	switch m.rng.IntN(6) {
	case 0, 1:
		p := m.random(n)
		if _, err := m.f.WriteAt(p, off); err != nil {
			m.t.Fatal(err)
		}
		copy(m.cached[off:], p)
	case 2:
		p := m.random(n)
		if _, err := m.f.WriteAtFUA(p, off); err != nil {
			m.t.Fatal(err)
		}
		copy(m.cached[off:], p)
		copy(m.durable[off:], p)
	case 3:
		if err := m.f.WriteZeroes(off, n, blockdev.ZeroFlags(m.rng.IntN(4))); err != nil {
			m.t.Fatal(err)
		}
		clear(m.cached[off : off+n])
	case 4:
		if err := m.f.Trim(off, n); err != nil {
			m.t.Fatal(err)
		}
		clear(m.cached[off : off+n]) // Mem trims to zeroes
	case 5:
		if err := m.f.Flush(); err != nil {
			m.t.Fatal(err)
		}
		copy(m.durable, m.cached)
	}
}

func (m *faultyModel) check(dev blockdev.Device, want []byte, what string) {
	m.t.Helper()
	got := make([]byte, len(want))
	if n, err := dev.ReadAt(got, 0); n != len(got) || (err != nil && err != io.EOF) {
		m.t.Fatalf("%s: read: %d, %v", what, n, err)
	}
	if i := firstDiff(got, want); i >= 0 {
		m.t.Fatalf("%s: byte at %d is %#x, want %#x", what, i, got[i], want[i])
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestFaultyPowerCutLosesExactlyTheUnflushed runs random writes, FUA writes, zeroings,
// trims and flushes, and checks after each power cut that the device holds exactly what
// was durable, while the lower device never shows more than that before a Flush.
func TestFaultyPowerCutLosesExactlyTheUnflushed(t *testing.T) {
	m := newFaultyModel(t, 256<<10)
	for round := range 20 {
		for range 1 + m.rng.IntN(15) {
			m.step()
			m.check(m.f, m.cached, "read through the cache")
			m.check(m.f.Lower(), m.durable, "the lower device before a power cut")
		}
		if err := m.f.PowerCut(); err != nil {
			t.Fatal(err)
		}
		copy(m.cached, m.durable)
		m.check(m.f, m.durable, "after power cut "+string(rune('A'+round)))
		if s := m.f.Stats(); s.Cached != 0 {
			t.Fatalf("Stats().Cached = %d after a power cut", s.Cached)
		}
	}
}

// TestFaultyPowerCutRandom checks that a partial power cut leaves every 512-byte sector
// holding one of the contents it had since the last Flush (none older than a FUA write
// to it), that some sectors keep a cached version and others lose it, and that the seed
// makes it reproducible.
// TestFaultyPowerCutRandom checks PowerCutRandom at the default atomic unit of 512
// bytes and at 4 KiB (SetAtomicUnit): every unit holds one of its versions, all of its
// bytes from the same one.
func TestFaultyPowerCutRandom(t *testing.T) {
	for _, unit := range []int64{512, 4096} {
		t.Run(fmt.Sprint(unit), func(t *testing.T) { testPowerCutRandom(t, unit) })
	}
}

func TestFaultySetAtomicUnitRefuses(t *testing.T) {
	for _, unit := range []int64{0, 256, 1000, 4097} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("SetAtomicUnit(%d) did not panic", unit)
				}
			}()
			blockdev.NewFaulty(blockdev.NewMem(4096)).SetAtomicUnit(unit)
		}()
	}
}

func testPowerCutRandom(t *testing.T, unit int64) {
	const size = 128<<10 + 100 // a partial sector at the end
	run := func(seed uint64) []byte {
		f := blockdev.NewFaulty(blockdev.NewMem(size))
		f.SetAtomicUnit(unit)
		r := rand.New(rand.NewPCG(5, 6))
		random := func(n int64) []byte {
			p := make([]byte, n)
			for i := range p {
				p[i] = byte(r.Uint32())
			}
			return p
		}
		base := random(size)
		if _, err := f.WriteAt(base, 0); err != nil {
			t.Fatal(err)
		}
		if err := f.Flush(); err != nil {
			t.Fatal(err)
		}
		sectorOf := func(p []byte, s int64) []byte { return p[s*unit : min((s+1)*unit, size)] }
		nsec := (size + unit - 1) / unit
		// versions[s] are the contents sector s had since the Flush, oldest first;
		// floor[s] is the first that may survive.
		versions := make([][][]byte, nsec)
		floor := make([]int, nsec)
		for s := range nsec {
			versions[s] = [][]byte{sectorOf(base, s)}
		}
		state := bytes.Clone(base)
		for i := range 60 {
			off := r.Int64N(size - 1)
			n := min(1+r.Int64N(8192), size-off)
			var err error
			fua := false
			switch r.IntN(6) {
			case 0:
				fua = true
				p := random(n)
				_, err = f.WriteAtFUA(p, off)
				copy(state[off:], p)
			case 1:
				err = f.WriteZeroes(off, n, 0)
				clear(state[off : off+n])
			default:
				p := random(n)
				_, err = f.WriteAt(p, off)
				copy(state[off:], p)
			}
			if err != nil {
				t.Fatalf("change %d: %v", i, err)
			}
			for s := off / unit; s <= (off+n-1)/unit; s++ {
				versions[s] = append(versions[s], bytes.Clone(sectorOf(state, s)))
				if fua {
					floor[s] = len(versions[s]) - 1
				}
			}
		}
		if err := f.PowerCutRandom(seed); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, size)
		if _, err := f.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		kept, lost := 0, 0
		for s := range nsec {
			idx := -1
			for i, v := range versions[s] {
				if bytes.Equal(sectorOf(got, s), v) {
					idx = i
				}
			}
			switch {
			case idx < 0:
				t.Fatalf("seed %d: sector %d holds contents it never had", seed, s)
			case idx < floor[s]:
				t.Fatalf("seed %d: sector %d holds version %d, older than its FUA write (version %d)", seed, s, idx, floor[s])
			case len(versions[s]) == 1:
			case idx == 0:
				lost++
			default:
				kept++
			}
		}
		if kept == 0 || lost == 0 {
			t.Fatalf("seed %d: %d changed sectors kept a cached version, %d lost them all: want some of each", seed, kept, lost)
		}
		return got
	}
	a, b, c := run(1), run(1), run(2)
	if !bytes.Equal(a, b) {
		t.Error("PowerCutRandom with the same seed gave different results")
	}
	if bytes.Equal(a, c) {
		t.Error("PowerCutRandom with different seeds gave the same result")
	}
}

func TestFaultyFUASurvivesPowerCut(t *testing.T) {
	f := blockdev.NewFaulty(blockdev.NewMem(64 << 10))
	old := bytes.Repeat([]byte{1}, 4096)
	fua := bytes.Repeat([]byte{2}, 4096)
	later := bytes.Repeat([]byte{3}, 4096)
	f.WriteAt(old, 0)      // cached, older than the FUA write
	f.WriteAtFUA(fua, 0)   // durable
	f.WriteAt(later, 4096) // cached, lost
	for _, cut := range []func() error{f.PowerCut, func() error { return f.PowerCutRandom(9) }} {
		if err := cut(); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 8192)
		f.ReadAt(got, 0)
		if !bytes.Equal(got[:4096], fua) {
			t.Fatal("the FUA write did not survive a power cut, or an older write came back over it")
		}
		if !bytes.Equal(got[4096:], make([]byte, 4096)) && !bytes.Equal(got[4096:], later) {
			t.Fatal("an unflushed write left something it never wrote")
		}
	}
	if s := f.Stats(); s.FUAWrites != 1 || s.Writes != 2 {
		t.Fatalf("stats %+v", s)
	}
}

func TestFaultyVanishAndReinsert(t *testing.T) {
	f := blockdev.NewFaulty(blockdev.NewMem(64 << 10))
	p := bytes.Repeat([]byte{0xab}, 4096)
	if _, err := f.WriteAt(p, 4096); err != nil {
		t.Fatal(err)
	}
	f.Vanish()
	want := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, blockdev.ErrVanished) || !errors.Is(err, blockdev.ErrGone) || !errors.Is(err, syscall.ENODEV) {
			t.Errorf("%s on a vanished device: %v, want ErrVanished, ErrGone and ENODEV", what, err)
		}
	}
	_, err := f.ReadAt(make([]byte, 10), 0)
	want("ReadAt", err)
	_, err = f.WriteAt(make([]byte, 10), 0)
	want("WriteAt", err)
	_, err = f.WriteAtFUA(make([]byte, 10), 0)
	want("WriteAtFUA", err)
	want("Flush", f.Flush())
	want("Trim", f.Trim(0, 10))
	want("WriteZeroes", f.WriteZeroes(0, 10, 0))
	if f.Size() != 64<<10 {
		t.Errorf("Size of a vanished device: %d", f.Size())
	}
	if s := f.Stats(); s.Failed != 6 || s.Cached != 1 {
		t.Errorf("stats after 6 failed calls with one write cached: %+v", s)
	}
	f.Reinsert()
	got := make([]byte, 4096)
	if _, err := f.ReadAt(got, 4096); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("after Reinsert: %v, contents equal: %v", err, bytes.Equal(got, p))
	}
	// Close works on a vanished device and writes the cache back.
	f.Vanish()
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Lower().ReadAt(got, 4096); !errors.Is(err, blockdev.ErrClosed) {
		t.Fatalf("the lower device is still open after Close: %v", err)
	}
}

func TestFaultyInjectedErrors(t *testing.T) {
	f := blockdev.NewFaulty(blockdev.NewMem(64 << 10))
	custom := errors.New("medium error")
	removeRead := f.InjectError(8192, 4096, blockdev.FaultRead, nil)
	removeWrite := f.InjectError(32768, 512, blockdev.FaultWrite, custom)
	read := func(off, n int64) error { _, err := f.ReadAt(make([]byte, n), off); return err }
	write := func(off, n int64) error { _, err := f.WriteAt(make([]byte, n), off); return err }
	fua := func(off, n int64) error { _, err := f.WriteAtFUA(make([]byte, n), off); return err }
	zero := func(off, n int64) error { return f.WriteZeroes(off, n, 0) }
	for _, c := range []struct {
		what   string
		op     func(off, n int64) error
		off, n int64
		want   error // nil: must succeed
	}{
		{"read in the read fault", read, 8192, 1, syscall.EIO},
		{"read across its start", read, 4096, 4097, syscall.EIO},
		{"read across its end", read, 12287, 2, syscall.EIO},
		{"read just before it", read, 4096, 4096, nil},
		{"read just after it", read, 12288, 4096, nil},
		{"write in the read fault", write, 8192, 4096, nil},
		{"write in the write fault", write, 32768 + 511, 1, custom},
		{"FUA write across the write fault", fua, 30000, 4096, custom},
		{"zeroing across the write fault", zero, 32000, 1000, custom},
		{"trim across the write fault", f.Trim, 32000, 1000, custom},
		{"read in the write fault", read, 32768, 512, nil},
		{"write just after the write fault", write, 32768 + 512, 512, nil},
	} {
		err := c.op(c.off, c.n)
		if c.want == nil && err != nil {
			t.Errorf("%s (%d, %d): %v", c.what, c.off, c.n, err)
		}
		if c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("%s (%d, %d): %v, want %v", c.what, c.off, c.n, err, c.want)
		}
	}
	// A failed write changes nothing.
	before := make([]byte, 4096)
	f.ReadAt(before, 30000)
	if _, err := f.WriteAt(bytes.Repeat([]byte{9}, 4096), 30000); err == nil {
		t.Fatal("write across the write fault succeeded")
	}
	after := make([]byte, 4096)
	f.ReadAt(after, 30000)
	if !bytes.Equal(before, after) {
		t.Fatal("a failed write changed the device")
	}
	removeRead()
	if err := read(8192, 4096); err != nil {
		t.Fatalf("read after the fault was removed: %v", err)
	}
	removeWrite()
	removeWrite() // removing twice is harmless
	f.InjectError(0, 64<<10, blockdev.FaultReadWrite, nil)
	if read(0, 1) == nil || write(0, 1) == nil {
		t.Fatal("a read-write fault let a call through")
	}
	f.ClearFaults()
	if read(0, 1) != nil || write(0, 1) != nil {
		t.Fatal("ClearFaults left a fault")
	}
}

// TestFaultyFailedFlushKeepsTheCache checks FailFlush, and a Flush that fails because
// the lower device fails: the writes stay cached (and lost by a power cut) until a Flush
// succeeds.
func TestFaultyFailedFlushKeepsTheCache(t *testing.T) {
	lower := blockdev.NewFaulty(blockdev.NewMem(64 << 10))
	f := blockdev.NewFaulty(lower)
	p := bytes.Repeat([]byte{7}, 4096)
	f.WriteAt(p, 0)
	f.WriteAt(p, 16384)
	remove := f.FailFlush(nil)
	if err := f.Flush(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Flush under FailFlush: %v", err)
	}
	remove()
	removeLower := lower.InjectError(16384, 1, blockdev.FaultWrite, nil)
	if err := f.Flush(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Flush onto a failing lower device: %v", err)
	}
	if s := f.Stats(); s.Cached != 1 || s.Flushes != 2 || s.Failed != 2 {
		t.Fatalf("after a Flush that wrote back the first of two writes: %+v", s)
	}
	removeLower()
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.PowerCut(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	f.ReadAt(got, 16384)
	if !bytes.Equal(got, p) {
		t.Fatal("a write flushed by the retried Flush was lost")
	}
}

// noCaps is a Device without optional capabilities.
type noCaps struct{ blockdev.Device }

func TestFaultyWithoutLowerCapabilities(t *testing.T) {
	f := blockdev.NewFaulty(noCaps{blockdev.NewMem(64 << 10)})
	if c := f.Caps(); c.Trim || c.FastZero || !c.Zeroes || !c.FUA {
		t.Errorf("Caps over a device without capabilities: %+v, want Zeroes and FUA only", c)
	}
	if err := f.Trim(0, 4096); !errors.Is(err, blockdev.ErrNotSupported) {
		t.Errorf("Trim over a device that cannot: %v", err)
	}
	if err := f.WriteZeroes(0, 4096, blockdev.ZeroFast); !errors.Is(err, blockdev.ErrNotFast) {
		t.Errorf("fast WriteZeroes over a device without ZeroWriter: %v", err)
	}
	f.WriteAt(bytes.Repeat([]byte{1}, 8192), 0)
	if err := f.WriteZeroes(100, 5000, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	f.Lower().ReadAt(got, 0)
	want := bytes.Repeat([]byte{1}, 8192)
	clear(want[100:5100])
	if !bytes.Equal(got, want) {
		t.Fatal("a zeroing flushed onto a device without ZeroWriter was not written as zeroes")
	}
}

// TestFaultyTogglesUnderLoad switches faults on and off while goroutines do I/O: every
// call succeeds or fails with one of the injected errors (run it with -race).
func TestFaultyTogglesUnderLoad(t *testing.T) {
	f := blockdev.NewFaulty(blockdev.NewMem(256 << 10))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			p := make([]byte, 4096)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64((w*64+i%64)*4096) % (256 << 10)
				var err error
				switch i % 4 {
				case 0:
					_, err = f.ReadAt(p, off)
				case 1:
					_, err = f.WriteAt(p, off)
				case 2:
					err = f.Flush()
				case 3:
					err = f.WriteZeroes(off, 4096, 0)
				}
				if err != nil && !errors.Is(err, syscall.EIO) && !errors.Is(err, blockdev.ErrVanished) {
					t.Errorf("call beside fault switching: %v", err)
					return
				}
			}
		})
	}
	for i := 0; f.Stats().Reads < 2000 && !t.Failed(); i++ { // a failed worker returns
		switch i % 4 {
		case 0:
			f.Vanish()
		case 1:
			f.Reinsert()
		case 2:
			remove := f.InjectError(int64(i)*512, 8192, blockdev.FaultReadWrite, nil)
			defer remove()
		case 3:
			f.FailFlush(nil)
			f.ClearFaults()
			f.Stats()
		}
	}
	close(stop)
	wg.Wait()
	if s := f.Stats(); s.Reads == 0 || s.Writes == 0 || s.Flushes == 0 || s.WriteZeroes == 0 {
		t.Fatalf("the workers did not run: %+v", s)
	}
}

// TestFaultyErrorClasses: an injected error without a cause is a medium error, an
// injected errno gets its class, and a failed flush too.
func TestFaultyErrorClasses(t *testing.T) {
	f := blockdev.NewFaulty(blockdev.NewMem(64 << 10))
	f.InjectError(0, 4096, blockdev.FaultReadWrite, nil)
	f.InjectError(8192, 4096, blockdev.FaultRead, syscall.ENXIO)
	f.InjectError(16384, 4096, blockdev.FaultRead, errors.New("no class"))
	for _, c := range []struct {
		off   int64
		errno error
		class error // nil: none
	}{
		{0, syscall.EIO, blockdev.ErrMedium},
		{8192, syscall.ENXIO, blockdev.ErrGone},
		{16384, nil, nil},
	} {
		_, err := f.ReadAt(make([]byte, 512), c.off)
		if c.errno != nil && !errors.Is(err, c.errno) {
			t.Errorf("read at %d: %v, want %v", c.off, err, c.errno)
		}
		for _, class := range []error{blockdev.ErrMedium, blockdev.ErrGone} {
			if errors.Is(err, class) != (class == c.class) {
				t.Errorf("read at %d: %v: matches %v is %v", c.off, err, class, class != c.class)
			}
		}
	}
	if _, err := f.WriteAt(make([]byte, 512), 100); !errors.Is(err, blockdev.ErrMedium) || !errors.Is(err, syscall.EIO) {
		t.Errorf("write in a medium error: %v, want ErrMedium and EIO", err)
	}
	f.FailFlush(nil)
	if err := f.Flush(); !errors.Is(err, blockdev.ErrMedium) || !errors.Is(err, syscall.EIO) {
		t.Errorf("failed flush: %v, want ErrMedium and EIO", err)
	}
}

// TestFaultyHang: calls block while the hang is in place and run when it is released;
// Size, Caps, Close and the power cuts do not block.
func TestFaultyHang(t *testing.T) {
	f := blockdev.NewFaulty(blockdev.NewMem(64 << 10))
	release := f.Hang()
	if again := f.Hang(); again == nil {
		t.Fatal("Hang while hanging returned no release")
	}
	done := make(chan error, 6)
	calls := []func() error{
		func() error { _, err := f.ReadAt(make([]byte, 512), 0); return err },
		func() error { _, err := f.WriteAt(bytes.Repeat([]byte{3}, 512), 0); return err },
		func() error { _, err := f.WriteAtFUA(make([]byte, 512), 4096); return err },
		func() error { return f.Trim(8192, 512) },
		func() error { return f.WriteZeroes(12288, 512, 0) },
		f.Flush,
	}
	for _, call := range calls {
		go func() { done <- call() }()
	}
	waitFor(t, "every call blocks", func() bool { return f.Stats().Hung == len(calls) })
	select {
	case err := <-done:
		t.Fatalf("a call returned (%v) while the device hangs", err)
	case <-time.After(50 * time.Millisecond):
	}
	if f.Size() != 64<<10 || f.Caps().BlockSize != 512 || f.PowerCut() != nil {
		t.Error("Size, Caps or PowerCut misbehave while the device hangs")
	}
	release()
	release() // harmless
	for range calls {
		if err := <-done; err != nil {
			t.Errorf("a call released from the hang: %v", err)
		}
	}
	if s := f.Stats(); s.Hung != 0 || s.Reads != 1 || s.Flushes != 1 {
		t.Errorf("stats after the hang: %+v", s)
	}
	if _, err := f.ReadAt(make([]byte, 512), 0); err != nil {
		t.Errorf("a call after the hang: %v", err)
	}
	release = f.Hang()
	go func() { _, err := f.ReadAt(make([]byte, 512), 0); done <- err }()
	waitFor(t, "a call blocks", func() bool { return f.Stats().Hung == 1 })
	if err := f.Close(); err != nil {
		t.Errorf("Close while a call hangs: %v", err)
	}
	release()
	if err := <-done; !errors.Is(err, blockdev.ErrClosed) {
		t.Errorf("a call released after Close: %v, want ErrClosed", err)
	}
}
