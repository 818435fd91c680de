// Package blockdevtest is the conformance suite that every blockdev.Device of atrest
// passes (File, Mem, Faulty, Bounded, blockcrypt, the NBD client): Run checks ranges
// around sector boundaries and the end of the device, a random write/read model,
// concurrent callers, flush and reopen, the optional capabilities and that the device's
// Caps match what it does, and the behaviour after Close. RunFaults checks that a layer
// that wraps another device surfaces each error class of the device below (injected
// with blockdev.Faulty) as errors.Is-able, passes on its capabilities, and can be
// bounded in time when the device below hangs.
//
// Run and RunFaults call the Config's functions from their subtests, one at a time;
// they use the devices from several goroutines at once, as the Device contract allows.
package blockdevtest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

// Config describes the device under test and where it may legitimately differ from others.
type Config struct {
	// New returns a fresh device of at least size bytes (the suite then uses its Size)
	// and registers its own cleanup, which must accept a device that the suite closed
	// already (Close then fails with ErrClosed). The contents of a writable device may be
	// anything; a read-only one (its Caps say ReadOnly) must hold Fill's pattern, and
	// the suite then only reads and checks that every change is refused.
	New func(t *testing.T, size int64) blockdev.Device

	// Size is what the suite asks New for; 0 means 2 MiB. Keep it a multiple of 4096.
	Size int64

	// TrimZeroes says that a trimmed range reads back as zeroes (a regular file with
	// punched holes, Mem). Otherwise the suite only checks that Trim leaves the rest of
	// the device alone.
	TrimZeroes bool

	// NewReopenable is New for a device whose storage outlives it; set one of the two.
	// With the device it returns reopen, which closes that device (or the last one
	// reopen returned) and returns a device over the same storage as it would be after a
	// restart (reopening a file, or a power cut on a Faulty device), with its own cleanup
	// registered. The suite then also checks that what Flush and WriteAtFUA made durable
	// is there.
	NewReopenable func(t *testing.T, size int64) (dev blockdev.Device, reopen Reopen)

	// AtomicSector is the granularity at which concurrent overlapping writes do not tear:
	// every such sector ends up holding exactly one of the writes. 0 means 512.
	AtomicSector int
}

// Reopen closes the device it was made for, or the last one it returned, and returns
// a device over the same storage (Config.NewReopenable).
type Reopen func(t *testing.T) blockdev.Device

// Run runs the conformance suite on the devices that cfg.New (or cfg.NewReopenable)
// makes.
func Run(t *testing.T, cfg Config) {
	switch {
	case (cfg.New == nil) == (cfg.NewReopenable == nil):
		t.Fatal("blockdevtest: set one of Config.New and Config.NewReopenable")
	case cfg.New == nil:
		cfg.New = func(t *testing.T, size int64) blockdev.Device {
			dev, _ := cfg.NewReopenable(t, size)
			return dev
		}
	}
	if cfg.Size == 0 {
		cfg.Size = 2 << 20
	}
	if cfg.Size < 256<<10 {
		t.Fatalf("blockdevtest: Config.Size %d is below the 256 KiB the suite needs", cfg.Size)
	}
	if cfg.AtomicSector == 0 {
		cfg.AtomicSector = 512
	}
	s := &suite{cfg: cfg}
	t.Run("Size", s.testSize)
	if blockdev.CapsOf(s.newDevice(t)).ReadOnly {
		t.Run("Caps", s.testCapsReadOnly)
		t.Run("ReadOnlyBoundaries", s.testReadOnlyBoundaries)
		t.Run("ReadOnlyRefusesChanges", s.testReadOnlyRefusesChanges)
		t.Run("ConcurrentReads", s.testConcurrentReads)
		t.Run("Flush", s.testFlushReadOnly)
		t.Run("Closed", s.testClosed)
		return
	}
	t.Run("ZeroLength", s.testZeroLength)
	t.Run("Boundaries", s.testBoundaries)
	t.Run("End", s.testEnd)
	t.Run("OutOfRange", s.testOutOfRange)
	t.Run("Model", s.testModel)
	t.Run("ConcurrentDisjoint", s.testConcurrentDisjoint)
	t.Run("ConcurrentOverlapping", s.testConcurrentOverlapping)
	t.Run("Flush", s.testFlush)
	t.Run("Reopen", s.testReopen)
	t.Run("Trim", s.testTrim)
	t.Run("WriteZeroes", s.testWriteZeroes)
	t.Run("FUA", s.testFUA)
	t.Run("PreferredBlockSize", s.testPreferredBlockSize)
	t.Run("Caps", s.testCaps)
	t.Run("Closed", s.testClosed)
}

type suite struct {
	cfg Config
}

// Fill writes into p the pattern that a ReadOnly device holds at off: every byte depends
// on its offset, with no short period, so that a read from the wrong place shows.
func Fill(p []byte, off int64) {
	for i := range p {
		x := off + int64(i)
		p[i] = byte(mix64(uint64(x/8)) >> (8 * (x % 8)))
	}
}

// mix64 is SplitMix64's finalizer.
func mix64(z uint64) uint64 {
	z += 0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// rng returns the test's random generator, seeded from BLOCKDEVTEST_SEED (default 1)
// and the test name; a failed test logs the seed.
func rng(t *testing.T) *rand.Rand {
	seed := uint64(1)
	if v := os.Getenv("BLOCKDEVTEST_SEED"); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 0, 64); err != nil {
			t.Fatalf("BLOCKDEVTEST_SEED=%q: %v", v, err)
		}
	}
	h := uint64(14695981039346656037)
	for _, c := range []byte(t.Name()) {
		h = (h ^ uint64(c)) * 1099511628211
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("random seed %d (BLOCKDEVTEST_SEED=%d replays it)", seed, seed)
		}
	})
	return rand.New(rand.NewPCG(seed, h))
}

// newDevice returns a fresh device and checks its size.
func (s *suite) newDevice(t *testing.T) blockdev.Device {
	t.Helper()
	return s.checkNew(t, s.cfg.New(t, s.cfg.Size))
}

func (s *suite) checkNew(t *testing.T, dev blockdev.Device) blockdev.Device {
	t.Helper()
	if dev == nil {
		t.Fatal("Config.New returned nil")
	}
	if dev.Size() < s.cfg.Size {
		t.Fatalf("Config.New(%d) returned a device of %d bytes", s.cfg.Size, dev.Size())
	}
	return dev
}

// model is a device with a plain copy of what it must hold.
type model struct {
	t    *testing.T
	dev  blockdev.Device
	data []byte
	rng  *rand.Rand
}

// newModel returns a fresh device and its model, which starts as whatever it holds.
func (s *suite) newModel(t *testing.T) *model {
	t.Helper()
	return s.modelOf(t, s.newDevice(t))
}

// modelOf returns the model of dev, which starts as whatever it holds.
func (s *suite) modelOf(t *testing.T, dev blockdev.Device) *model {
	t.Helper()
	m := &model{t: t, dev: dev, data: make([]byte, dev.Size()), rng: rng(t)}
	n, err := dev.ReadAt(m.data, 0)
	if n != len(m.data) || (err != nil && err != io.EOF) {
		t.Fatalf("read the whole device of %d bytes: %d, %v", len(m.data), n, err)
	}
	return m
}

func (m *model) size() int64 { return int64(len(m.data)) }

// random returns n random bytes.
func (m *model) random(n int) []byte {
	p := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := m.rng.Uint64()
		for j := i; j < min(i+8, n); j++ {
			p[j] = byte(v)
			v >>= 8
		}
	}
	return p
}

// write writes p at off, which must succeed, and records it.
func (m *model) write(p []byte, off int64) {
	m.t.Helper()
	n, err := m.dev.WriteAt(p, off)
	if err != nil || n != len(p) {
		m.t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(p), off, n, err)
	}
	copy(m.data[off:], p)
}

// check reads [off, off+n) clamped to the device and compares it with the model.
func (m *model) check(off, n int64) {
	m.t.Helper()
	off = max(off, 0)
	n = min(n, m.size()-off)
	if n <= 0 {
		return
	}
	got := readOK(m.t, m.dev, off, n)
	if i := firstDiff(got, m.data[off:off+n]); i >= 0 {
		m.t.Fatalf("read at %d length %d: byte at offset %d is %#x, want %#x", off, n, off+int64(i), got[i], m.data[off+int64(i)])
	}
}

// checkAll compares the whole device with the model.
func (m *model) checkAll() {
	m.t.Helper()
	m.check(0, m.size())
}

// readOK reads [off, off+n), which lies within the device, and fails the test unless the
// read returns every byte (with nil, or io.EOF when it ends at the end of the device).
func readOK(t testing.TB, dev blockdev.Device, off, n int64) []byte {
	t.Helper()
	p := make([]byte, n)
	got, err := dev.ReadAt(p, off)
	if err == io.EOF && off+n == dev.Size() {
		err = nil
	}
	if err != nil || got != len(p) {
		t.Fatalf("ReadAt(%d bytes, %d) on a device of %d bytes = %d, %v", n, off, dev.Size(), got, err)
	}
	return p
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
	return min(len(a), len(b))
}

// boundaryOffsets are offsets at and around sector boundaries and the end of a device.
func boundaryOffsets(size int64) []int64 {
	var offs []int64
	for _, b := range []int64{0, 512, 4096, 8192, 65536, size/2 - size/2%4096, size - 4096, size - 512, size} {
		for _, d := range []int64{-1, 0, 1} {
			if o := b + d; o >= 0 && o < size {
				offs = append(offs, o)
			}
		}
	}
	return offs
}

var boundaryLengths = []int64{1, 2, 3, 511, 512, 513, 4095, 4096, 4097, 2*4096 + 7, 65536 + 513}

func (s *suite) testSize(t *testing.T) {
	dev := s.newDevice(t)
	if a, b := dev.Size(), dev.Size(); a != b {
		t.Fatalf("Size changed from %d to %d", a, b)
	}
}

func (s *suite) testZeroLength(t *testing.T) {
	m := s.newModel(t)
	for _, off := range []int64{0, 1, 511, 4096, m.size() - 1, m.size()} {
		if n, err := m.dev.ReadAt(nil, off); n != 0 || err != nil {
			t.Errorf("ReadAt(0 bytes, %d) = %d, %v; want 0, nil", off, n, err)
		}
		if n, err := m.dev.WriteAt(nil, off); n != 0 || err != nil {
			t.Errorf("WriteAt(0 bytes, %d) = %d, %v; want 0, nil", off, n, err)
		}
	}
	m.checkAll()
}

func (s *suite) testBoundaries(t *testing.T) {
	m := s.newModel(t)
	for _, off := range boundaryOffsets(m.size()) {
		for _, n := range boundaryLengths {
			if off+n > m.size() {
				continue
			}
			m.write(m.random(int(n)), off)
			m.check(off-4096, n+8192)
		}
	}
	m.checkAll()
}

func (s *suite) testEnd(t *testing.T) {
	m := s.newModel(t)
	size := m.size()
	m.write(m.random(8192), size-8192)

	// The last byte, the last sectors, exactly.
	m.write([]byte{0xa5}, size-1)
	m.check(size-1, 1)
	m.check(size-512, 512)
	m.check(size-4096, 4096)

	// Reads that reach past the end return what is before it and io.EOF.
	for _, c := range []struct{ off, n int64 }{{size - 10, 20}, {size - 1, 2}, {size - 4096, 8192}, {size - 513, 1024}} {
		p := make([]byte, c.n)
		n, err := m.dev.ReadAt(p, c.off)
		if want := size - c.off; int64(n) != want || err != io.EOF {
			t.Errorf("ReadAt(%d bytes, %d) on %d bytes = %d, %v; want %d, io.EOF", c.n, c.off, size, n, err, want)
		} else if i := firstDiff(p[:n], m.data[c.off:]); i >= 0 {
			t.Errorf("ReadAt(%d bytes, %d): byte %d differs", c.n, c.off, i)
		}
	}
	// At and beyond the end: nothing, io.EOF; a zero-length read at the end is fine.
	for _, off := range []int64{size, size + 1, size + 4096} {
		if n, err := m.dev.ReadAt(make([]byte, 1), off); n != 0 || err != io.EOF {
			t.Errorf("ReadAt(1 byte, %d) on %d bytes = %d, %v; want 0, io.EOF", off, size, n, err)
		}
	}
	if n, err := m.dev.ReadAt(nil, size); n != 0 || err != nil {
		t.Errorf("ReadAt(0 bytes, size) = %d, %v; want 0, nil", n, err)
	}
	if n, err := m.dev.WriteAt(nil, size); n != 0 || err != nil {
		t.Errorf("WriteAt(0 bytes, size) = %d, %v; want 0, nil", n, err)
	}
	m.checkAll()
}

// wantOutOfRange fails the test unless err wraps ErrOutOfRange.
func wantOutOfRange(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Errorf("%s: error %v, want one wrapping ErrOutOfRange", what, err)
	}
}

func (s *suite) testOutOfRange(t *testing.T) {
	m := s.newModel(t)
	size := m.size()
	m.write(m.random(8192), size-8192)
	m.write(m.random(8192), 0)
	ranges := []struct{ off, n int64 }{
		{size, 1}, {size - 1, 2}, {size - 4096, 8192}, {size + 4096, 4096}, {-1, 1}, {-4096, 8192}, {-1 << 40, 512},
	}
	for _, r := range ranges {
		what := fmt.Sprintf("WriteAt(%d bytes, %d) on %d bytes", r.n, r.off, size)
		n, err := m.dev.WriteAt(m.random(int(r.n)), r.off)
		wantOutOfRange(t, what, err)
		if n != 0 {
			t.Errorf("%s wrote %d bytes, want 0", what, n)
		}
		if r.off < 0 {
			what = fmt.Sprintf("ReadAt(%d bytes, %d)", r.n, r.off)
			n, err := m.dev.ReadAt(make([]byte, r.n), r.off)
			wantOutOfRange(t, what, err)
			if n != 0 {
				t.Errorf("%s read %d bytes, want 0", what, n)
			}
		}
		if f, ok := m.dev.(blockdev.FUAWriter); ok {
			_, err := f.WriteAtFUA(m.random(int(r.n)), r.off)
			wantOutOfRange(t, fmt.Sprintf("WriteAtFUA(%d bytes, %d)", r.n, r.off), err)
		}
		if tr, ok := m.dev.(blockdev.Trimmer); ok {
			wantOutOfRange(t, fmt.Sprintf("Trim(%d, %d)", r.off, r.n), tr.Trim(r.off, r.n))
		}
		if z, ok := m.dev.(blockdev.ZeroWriter); ok {
			wantOutOfRange(t, fmt.Sprintf("WriteZeroes(%d, %d)", r.off, r.n), z.WriteZeroes(r.off, r.n, 0))
		}
	}
	if tr, ok := m.dev.(blockdev.Trimmer); ok {
		wantOutOfRange(t, "Trim with a negative length", tr.Trim(4096, -1))
	}
	if z, ok := m.dev.(blockdev.ZeroWriter); ok {
		wantOutOfRange(t, "WriteZeroes with a negative length", z.WriteZeroes(4096, -1, 0))
	}
	m.checkAll()
}

// randomRange returns a random range within [lo, hi), often aligned to 512 or 4096, of
// at most maxLen bytes (at least 1).
func randomRange(r *rand.Rand, lo, hi, maxLen int64) (off, n int64) {
	n = 1 + r.Int64N(maxLen)
	switch r.IntN(4) {
	case 0:
		n = 4096 * (1 + r.Int64N(max(maxLen/4096, 1)))
	case 1:
		n = 512 * (1 + r.Int64N(max(maxLen/512, 1)))
	}
	n = min(n, hi-lo)
	off = lo + r.Int64N(hi-lo-n+1)
	switch r.IntN(4) {
	case 0:
		off = max(lo, off-off%4096)
	case 1:
		off = max(lo, off-off%512)
	}
	return off, n
}

func (s *suite) testModel(t *testing.T) {
	m := s.newModel(t)
	zf, hasZero := m.dev.(blockdev.ZeroWriter)
	tr, hasTrim := m.dev.(blockdev.Trimmer)
	for i := range 400 {
		off, n := randomRange(m.rng, 0, m.size(), 64<<10)
		switch op := m.rng.IntN(20); {
		case op < 9:
			m.write(m.random(int(n)), off)
		case op < 15:
			m.check(off, n)
		case op < 16:
			p := m.random(int(n))
			if k, err := blockdev.WriteFUA(m.dev, p, off); err != nil || k != len(p) {
				t.Fatalf("op %d: WriteFUA(%d bytes, %d) = %d, %v", i, n, off, k, err)
			}
			copy(m.data[off:], p)
		case op < 17:
			if err := m.dev.Flush(); err != nil {
				t.Fatalf("op %d: Flush: %v", i, err)
			}
		case op < 18 && hasZero:
			flags := blockdev.ZeroFlags(m.rng.IntN(4))
			switch err := zf.WriteZeroes(off, n, flags); {
			case err == nil:
				clear(m.data[off : off+n])
			case errors.Is(err, blockdev.ErrNotFast) && flags&blockdev.ZeroFast != 0:
			default:
				t.Fatalf("op %d: WriteZeroes(%d, %d, %#x): %v", i, off, n, flags, err)
			}
		case op < 19 && hasTrim && s.cfg.TrimZeroes:
			switch err := tr.Trim(off, n); {
			case err == nil:
				clear(m.data[off : off+n])
			case errors.Is(err, blockdev.ErrNotSupported):
			default:
				t.Fatalf("op %d: Trim(%d, %d): %v", i, off, n, err)
			}
		default:
			m.check(off-n, 3*n)
		}
	}
	m.checkAll()
}

// testConcurrentDisjoint runs writers on disjoint ranges whose borders fall inside
// sectors, so that a device that rewrites whole sectors must not lose a neighbour's
// bytes, with readers and flushes beside them.
func (s *suite) testConcurrentDisjoint(t *testing.T) {
	m := s.newModel(t)
	const workers = 4
	span := m.size() / workers
	bounds := make([]int64, workers+1)
	for i := 1; i < workers; i++ {
		bounds[i] = int64(i)*span + 777 // inside a sector, on purpose
	}
	bounds[workers] = m.size()
	seeds := make([]uint64, workers)
	for i := range seeds {
		seeds[i] = m.rng.Uint64()
	}

	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range workers {
		wg.Go(func() {
			lo, hi := bounds[w], bounds[w+1]
			r := rand.New(rand.NewPCG(seeds[w], uint64(w)))
			mine := m.data[lo:hi] // only this worker touches it until Wait
			for range 60 {
				var off, n int64
				switch r.IntN(3) {
				case 0: // at the low border
					off, n = lo, 1+r.Int64N(5000)
				case 1: // at the high border
					n = 1 + r.Int64N(5000)
					off = hi - n
				default:
					off, n = randomRange(r, lo, hi, 32<<10)
				}
				n = min(n, hi-off)
				p := make([]byte, n)
				for i := range p {
					p[i] = byte(r.Uint32())
				}
				if k, err := m.dev.WriteAt(p, off); err != nil || k != len(p) {
					t.Errorf("worker %d: WriteAt(%d bytes, %d) = %d, %v", w, n, off, k, err)
					return
				}
				copy(mine[off-lo:], p)
				// Check around the write; the final checkAll sees the rest.
				clo, chi := max(lo, off-8192), min(hi, off+n+8192)
				got := make([]byte, chi-clo)
				if k, err := m.dev.ReadAt(got, clo); k != len(got) || (err != nil && !(err == io.EOF && chi == m.size())) {
					t.Errorf("worker %d: ReadAt(%d bytes, %d) = %d, %v", w, len(got), clo, k, err)
					return
				}
				if i := firstDiff(got, mine[clo-lo:chi-lo]); i >= 0 {
					t.Errorf("worker %d: byte at offset %d is %#x, want %#x (after a write at %d length %d)", w, clo+int64(i), got[i], mine[clo-lo+int64(i)], off, n)
					return
				}
			}
		})
	}
	var side sync.WaitGroup
	side.Go(func() { // flushes and whole-device reads beside the writers
		buf := make([]byte, m.size())
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := m.dev.Flush(); err != nil {
				t.Errorf("Flush beside writers: %v", err)
				return
			}
			if _, err := m.dev.ReadAt(buf, 0); err != nil && err != io.EOF {
				t.Errorf("ReadAt beside writers: %v", err)
				return
			}
		}
	})
	wg.Wait()
	close(stop)
	side.Wait()
	if !t.Failed() {
		m.checkAll()
	}
}

// testConcurrentOverlapping runs rounds of writers released together over the same area
// with sector-aligned writes. After each round every sector must hold the data of one of
// the round's writes to it (or what it held before, if none wrote it), never a mixture.
func (s *suite) testConcurrentOverlapping(t *testing.T) {
	m := s.newModel(t)
	sec := int64(s.cfg.AtomicSector)
	const workers, rounds = 4, 30
	area := min(m.size(), 32<<10) / sec * sec
	sectors := area / sec
	for round := range rounds {
		// Each worker writes at least half of the area, so that the writes overlap.
		offs, bufs := make([]int64, workers), make([][]byte, workers)
		for w := range workers {
			count := sectors/2 + m.rng.Int64N(sectors/2+1)
			offs[w] = sec * m.rng.Int64N(sectors-count+1)
			bufs[w] = m.random(int(count * sec))
		}
		start := make(chan struct{})
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				<-start
				if k, err := m.dev.WriteAt(bufs[w], offs[w]); err != nil || k != len(bufs[w]) {
					t.Errorf("round %d, worker %d: WriteAt(%d bytes, %d) = %d, %v", round, w, len(bufs[w]), offs[w], k, err)
				}
			})
		}
		close(start)
		wg.Wait()
		if t.Failed() {
			return
		}
		got := readOK(t, m.dev, 0, area)
		for i := range sectors {
			have := got[i*sec : (i+1)*sec]
			written, ok := false, false
			for w := range workers {
				if o := i*sec - offs[w]; o >= 0 && o < int64(len(bufs[w])) {
					written = true
					ok = ok || bytes.Equal(have, bufs[w][o:o+sec])
				}
			}
			if !written {
				ok = bytes.Equal(have, m.data[i*sec:(i+1)*sec])
			}
			if !ok {
				t.Fatalf("round %d: sector %d (offset %d) holds none of the writes to it (a torn or lost write)", round, i, i*sec)
			}
		}
		copy(m.data, got)
	}
	m.checkAll()
}

func (s *suite) testFlush(t *testing.T) {
	m := s.newModel(t)
	if err := m.dev.Flush(); err != nil {
		t.Fatalf("Flush of a fresh device: %v", err)
	}
	for range 10 {
		off, n := randomRange(m.rng, 0, m.size(), 16<<10)
		m.write(m.random(int(n)), off)
		if err := m.dev.Flush(); err != nil {
			t.Fatalf("Flush after a write: %v", err)
		}
	}
	if err := m.dev.Flush(); err != nil {
		t.Fatalf("second Flush: %v", err)
	}
	m.checkAll()
}

// testReopen checks, with Config.NewReopenable, that flushed writes, FUA writes and
// flushed zeroings survive a restart.
func (s *suite) testReopen(t *testing.T) {
	if s.cfg.NewReopenable == nil {
		t.Skip("Config.NewReopenable is not set: the device has no storage that outlives it")
	}
	dev, reopen := s.cfg.NewReopenable(t, s.cfg.Size)
	m := s.modelOf(t, s.checkNew(t, dev))
	for range 20 {
		off, n := randomRange(m.rng, 0, m.size(), 16<<10)
		m.write(m.random(int(n)), off)
	}
	m.write(m.random(4096), m.size()-4096)
	if err := m.dev.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	m.dev = reopen(t)
	m.checkAll()

	// A FUA write is durable without Flush.
	p := m.random(5000)
	if n, err := blockdev.WriteFUA(m.dev, p, 12345); err != nil || n != len(p) {
		t.Fatalf("WriteFUA: %d, %v", n, err)
	}
	copy(m.data[12345:], p)
	m.dev = reopen(t)
	m.checkAll()

	// So is a flushed zeroing, and a flushed trim where trimmed ranges read as zeroes.
	if err := blockdev.WriteZeroes(m.dev, 100000, 70000, 0); err != nil {
		t.Fatalf("WriteZeroes: %v", err)
	}
	clear(m.data[100000:170000])
	if s.cfg.TrimZeroes {
		switch err := blockdev.Trim(m.dev, 200000, 50000); {
		case err == nil:
			clear(m.data[200000:250000])
		case !errors.Is(err, blockdev.ErrNotSupported):
			t.Fatalf("Trim: %v", err)
		}
	}
	if err := m.dev.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	m.dev = reopen(t)
	m.checkAll()
}

// zeroRanges are ranges for Trim and WriteZeroes: aligned, unaligned, inside one sector,
// across the 1 MiB chunk of the zero-buffer fallback, up to the end.
func zeroRanges(size int64) []struct{ off, n int64 } {
	all := []struct{ off, n int64 }{
		{0, 4096}, {4096, 512}, {1000, 3000}, {4000, 200}, {511, 2}, {8192 + 1, 3*4096 + 5},
		{65536, 0}, {100 << 10, (1 << 20) + 4096 + 3}, {size - 4096, 4096}, {size - 777, 777},
	}
	var fit []struct{ off, n int64 }
	for _, r := range all {
		if r.off+r.n <= size {
			fit = append(fit, r)
		}
	}
	return fit
}

func (s *suite) testTrim(t *testing.T) {
	m := s.newModel(t)
	if _, ok := m.dev.(blockdev.Trimmer); !ok {
		if err := blockdev.Trim(m.dev, 0, 4096); !errors.Is(err, blockdev.ErrNotSupported) {
			t.Fatalf("blockdev.Trim on a device without Trimmer: %v, want ErrNotSupported", err)
		}
		return
	}
	for _, r := range zeroRanges(m.size()) {
		lo, hi := max(r.off-8192, 0), min(r.off+r.n+8192, m.size())
		m.write(m.random(int(hi-lo)), lo)
		err := blockdev.Trim(m.dev, r.off, r.n)
		switch {
		case errors.Is(err, blockdev.ErrNotSupported):
			t.Logf("Trim(%d, %d): %v", r.off, r.n, err)
			m.check(lo, hi-lo)
			continue
		case err != nil:
			t.Fatalf("Trim(%d, %d): %v", r.off, r.n, err)
		}
		if s.cfg.TrimZeroes {
			clear(m.data[r.off : r.off+r.n])
		} else {
			// Unspecified contents: take what the device reads.
			copy(m.data[r.off:], readOK(t, m.dev, r.off, max(r.n, 0)))
		}
		m.check(lo, hi-lo)
		// The range works as before.
		m.write(m.random(int(r.n)), r.off)
		m.check(lo, hi-lo)
	}
	m.checkAll()
}

func (s *suite) testWriteZeroes(t *testing.T) {
	m := s.newModel(t)
	for flags := range blockdev.ZeroFlags(4) {
		for _, r := range zeroRanges(m.size()) {
			lo, hi := max(r.off-8192, 0), min(r.off+r.n+8192, m.size())
			m.write(m.random(int(hi-lo)), lo)
			switch err := blockdev.WriteZeroes(m.dev, r.off, r.n, flags); {
			case err == nil:
				clear(m.data[r.off : r.off+r.n])
			case errors.Is(err, blockdev.ErrNotFast) && flags&blockdev.ZeroFast != 0:
				// Nothing changed.
			default:
				t.Fatalf("WriteZeroes(%d, %d, %#x): %v", r.off, r.n, flags, err)
			}
			m.check(lo, hi-lo)
		}
	}
	m.checkAll()
}

func (s *suite) testFUA(t *testing.T) {
	m := s.newModel(t)
	f, direct := m.dev.(blockdev.FUAWriter)
	for _, r := range zeroRanges(m.size()) {
		p := m.random(int(r.n))
		n, err := blockdev.WriteFUA(m.dev, p, r.off)
		if err != nil || n != len(p) {
			t.Fatalf("WriteFUA(%d bytes, %d) = %d, %v", len(p), r.off, n, err)
		}
		copy(m.data[r.off:], p)
		m.check(r.off-4096, r.n+8192)
		if direct {
			p := m.random(int(r.n))
			if n, err := f.WriteAtFUA(p, r.off); err != nil || n != len(p) {
				t.Fatalf("WriteAtFUA(%d bytes, %d) = %d, %v", len(p), r.off, n, err)
			}
			copy(m.data[r.off:], p)
			m.check(r.off-4096, r.n+8192)
		}
	}
	m.checkAll()
}

func (s *suite) testPreferredBlockSize(t *testing.T) {
	dev := s.newDevice(t)
	bs := blockdev.PreferredBlockSize(dev)
	if bs <= 0 || bs&(bs-1) != 0 || bs > 16<<20 {
		t.Fatalf("PreferredBlockSize = %d, want a power of two up to 16 MiB", bs)
	}
	t.Logf("PreferredBlockSize = %d", bs)
}

// testClosed checks that every call after Close fails with ErrClosed.
func (s *suite) testClosed(t *testing.T) {
	dev := s.newDevice(t)
	if err := dev.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	want := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, blockdev.ErrClosed) {
			t.Errorf("%s after Close: %v, want an error wrapping ErrClosed", what, err)
		}
	}
	_, err := dev.ReadAt(make([]byte, 512), 0)
	want("ReadAt", err)
	_, err = dev.WriteAt(make([]byte, 512), 0)
	want("WriteAt", err)
	want("Flush", dev.Flush())
	if tr, ok := dev.(blockdev.Trimmer); ok {
		want("Trim", tr.Trim(0, 4096))
	}
	if z, ok := dev.(blockdev.ZeroWriter); ok {
		want("WriteZeroes", z.WriteZeroes(0, 4096, 0))
	}
	if f, ok := dev.(blockdev.FUAWriter); ok {
		_, err := f.WriteAtFUA(make([]byte, 512), 0)
		want("WriteAtFUA", err)
	}
	want("a second Close", dev.Close())
}

// checkFill compares [off, off+n) of a ReadOnly device with Fill.
func checkFill(t testing.TB, dev blockdev.Device, off, n int64) {
	t.Helper()
	got := readOK(t, dev, off, n)
	want := make([]byte, n)
	Fill(want, off)
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("read at %d length %d: byte at offset %d is %#x, want %#x (Fill)", off, n, off+int64(i), got[i], want[i])
	}
}

func (s *suite) testReadOnlyBoundaries(t *testing.T) {
	dev := s.newDevice(t)
	size := dev.Size()
	for _, off := range boundaryOffsets(size) {
		for _, n := range boundaryLengths {
			if off+n <= size {
				checkFill(t, dev, off, n)
			}
		}
	}
	p := make([]byte, 100)
	if n, err := dev.ReadAt(p, size-50); n != 50 || err != io.EOF {
		t.Errorf("ReadAt(100 bytes, size-50) = %d, %v; want 50, io.EOF", n, err)
	}
	if n, err := dev.ReadAt(p, size); n != 0 || err != io.EOF {
		t.Errorf("ReadAt(100 bytes, size) = %d, %v; want 0, io.EOF", n, err)
	}
	_, err := dev.ReadAt(p, -1)
	wantOutOfRange(t, "ReadAt at -1", err)
	checkFill(t, dev, 0, size)
}

func (s *suite) testReadOnlyRefusesChanges(t *testing.T) {
	dev := s.newDevice(t)
	want := func(what string, err error, alt error) {
		t.Helper()
		if !errors.Is(err, blockdev.ErrReadOnly) && (alt == nil || !errors.Is(err, alt)) {
			t.Errorf("%s on a read-only device: %v, want an error wrapping ErrReadOnly", what, err)
		}
	}
	n, err := dev.WriteAt(make([]byte, 4096), 0)
	want("WriteAt", err, nil)
	if n != 0 {
		t.Errorf("WriteAt on a read-only device wrote %d bytes", n)
	}
	_, err = blockdev.WriteFUA(dev, make([]byte, 4096), 4096)
	want("WriteFUA", err, nil)
	want("Trim", blockdev.Trim(dev, 0, 8192), blockdev.ErrNotSupported)
	want("WriteZeroes", blockdev.WriteZeroes(dev, 0, 8192, 0), nil)
	want("WriteZeroes (fast)", blockdev.WriteZeroes(dev, 0, 8192, blockdev.ZeroFast), blockdev.ErrNotFast)
	checkFill(t, dev, 0, dev.Size())
}

func (s *suite) testConcurrentReads(t *testing.T) {
	dev := s.newDevice(t)
	seed := rng(t).Uint64()
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(seed, uint64(w)))
			for range 50 {
				off, n := randomRange(r, 0, dev.Size(), 64<<10)
				p := make([]byte, n)
				if k, err := dev.ReadAt(p, off); k != len(p) || (err != nil && err != io.EOF) {
					t.Errorf("ReadAt(%d bytes, %d) = %d, %v", n, off, k, err)
					return
				}
				want := make([]byte, n)
				Fill(want, off)
				if !bytes.Equal(p, want) {
					t.Errorf("ReadAt(%d bytes, %d) differs from Fill", n, off)
					return
				}
			}
		})
	}
	wg.Wait()
}

// checkCapsTypes checks that the Caps of dev promise nothing its methods cannot do, and
// that BlockSize is PreferredBlockSize.
func checkCapsTypes(t *testing.T, dev blockdev.Device, c blockdev.Caps) {
	t.Helper()
	_, trimmer := dev.(blockdev.Trimmer)
	_, zeroWriter := dev.(blockdev.ZeroWriter)
	_, fuaWriter := dev.(blockdev.FUAWriter)
	for _, m := range []struct {
		cap, has bool
		what     string
	}{
		{c.Trim, trimmer, "Trim without a Trim method"},
		{c.Zeroes, zeroWriter, "Zeroes without a WriteZeroes method"},
		{c.FastZero, zeroWriter, "FastZero without a WriteZeroes method"},
		{c.FUA, fuaWriter, "FUA without a WriteAtFUA method"},
	} {
		if m.cap && !m.has {
			t.Errorf("Caps %+v say %s", c, m.what)
		}
	}
	if bs := blockdev.PreferredBlockSize(dev); c.BlockSize != bs {
		t.Errorf("Caps.BlockSize = %d, PreferredBlockSize = %d", c.BlockSize, bs)
	}
}

// testCaps checks that a writable device's Caps match what it does: one that says Trim
// trims, one that does not refuses with ErrNotSupported; one without FastZero refuses
// ZeroFast with ErrNotFast. Either refusal changes nothing. A capability may go away
// when a call finds it missing (a File on a file system that cannot punch holes); then
// the Caps asked afterwards must say so. FUA and Zeroes are checked by the FUA,
// WriteZeroes and Reopen tests, ReadOnly by the suite's choice of tests.
func (s *suite) testCaps(t *testing.T) {
	m := s.newModel(t)
	c := blockdev.CapsOf(m.dev)
	t.Logf("Caps = %+v", c)
	checkCapsTypes(t, m.dev, c)
	m.write(m.random(64<<10), 0)

	switch err := blockdev.Trim(m.dev, 4096, 8192); {
	case c.Trim && err == nil:
		copy(m.data[4096:], readOK(t, m.dev, 4096, 8192)) // contents unspecified
	case c.Trim && errors.Is(err, blockdev.ErrNotSupported) && !blockdev.CapsOf(m.dev).Trim:
		t.Logf("Trim went away: %v", err)
	case c.Trim:
		t.Errorf("Caps say Trim, and Trim(4096, 8192) = %v", err)
	case !errors.Is(err, blockdev.ErrNotSupported):
		t.Errorf("Caps do not say Trim, and Trim(4096, 8192) = %v, want ErrNotSupported", err)
	}
	m.checkAll()

	for _, flags := range []blockdev.ZeroFlags{blockdev.ZeroFast, blockdev.ZeroFast | blockdev.ZeroMayUnmap} {
		switch err := blockdev.WriteZeroes(m.dev, 20000, 10000, flags); {
		case c.FastZero && err == nil:
			clear(m.data[20000:30000])
		case errors.Is(err, blockdev.ErrNotFast):
		case c.FastZero:
			t.Errorf("WriteZeroes(20000, 10000, %#x) = %v, want nil or ErrNotFast", flags, err)
		default:
			t.Errorf("Caps do not say FastZero, and WriteZeroes(20000, 10000, %#x) = %v, want ErrNotFast", flags, err)
		}
		m.checkAll()
	}
}

// testCapsReadOnly checks the Caps of a read-only device: nothing that changes it.
func (s *suite) testCapsReadOnly(t *testing.T) {
	dev := s.newDevice(t)
	c := blockdev.CapsOf(dev)
	checkCapsTypes(t, dev, c)
	if c.Trim || c.Zeroes || c.FastZero || c.FUA {
		t.Errorf("Caps %+v of a read-only device offer changes", c)
	}
}

func (s *suite) testFlushReadOnly(t *testing.T) {
	dev := s.newDevice(t)
	if err := dev.Flush(); err != nil {
		t.Fatalf("Flush of a read-only device: %v", err)
	}
}
