package blockdev

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
)

// FaultOp selects the calls that an injected error applies to.
type FaultOp uint8

const (
	// FaultRead applies to ReadAt.
	FaultRead FaultOp = 1 << iota
	// FaultWrite applies to every change: WriteAt, WriteAtFUA, Trim and WriteZeroes.
	FaultWrite
	// FaultReadWrite applies to reads and changes.
	FaultReadWrite = FaultRead | FaultWrite
)

// ErrVanished is wrapped by every error of a Faulty device that has vanished (see
// Faulty.Vanish), together with syscall.ENODEV, what the block layer answers for a
// drive gone offline. It is of the class ErrGone.
var ErrVanished = fmt.Errorf("%w: vanished", ErrGone)

// PowerCutSector is the default unit in which Faulty.PowerCutRandom keeps or loses
// unflushed changes: the smallest write any drive makes atomically. SetAtomicUnit
// models a drive with larger physical sectors.
const PowerCutSector = 512

// Faulty is a Device for tests that wraps another one (the lower device, which it owns)
// and injects faults on command, like nbdkit's error filter, while it models a drive with
// a volatile write cache:
//
//   - WriteAt, Trim and WriteZeroes go to the cache, which reads see at once; the lower
//     device does not change.
//   - Flush writes the cache to the lower device in order, flushes the lower device and
//     empties the cache: everything written before Flush is then durable.
//   - WriteAtFUA writes through to the lower device durably (blockdev.WriteFUA) before it
//     returns, and stays in the cache in order with the rest.
//   - PowerCut drops the cache: reads then return what was durable. PowerCutRandom
//     leaves each 512-byte sector (or atomic unit, see SetAtomicUnit) changed since the
//     last Flush with one of the contents it had since then, chosen at random (seeded),
//     as a real drive may have written back part of its cache in any order.
//   - Vanish makes every call fail as on a pulled drive (ErrGone), until Reinsert. It
//     does not touch the cache. A power failure under a running system is Vanish then
//     PowerCut, in that order: the other way round, writes made between the two calls
//     land on a drive that has lost the earlier ones, which no real power failure does.
//   - Close writes the cache to the lower device (a drive left running writes its cache
//     back eventually) and closes it; PowerCut first to lose it instead.
//   - InjectError makes calls on a range fail: by default with a medium error
//     (ErrMedium), as a drive with a bad range; an injected errno gets the class that
//     File gives it (see Classify).
//   - Hang makes calls block until released, as on a drive that stopped answering,
//     for tests of time bounds (see Bound).
//
// In the cache, a trimmed range reads as zeroes; Flush passes it on as a Trim, after
// which the lower device decides what it reads (one that refuses the Trim with
// ErrNotSupported then keeps its old contents, which Trim allows). Trim fails with
// ErrNotSupported when the lower device cannot trim, and WriteZeroes with ZeroFast
// fails with ErrNotFast when it cannot zero fast (its Caps); Flush passes zeroings on
// without ZeroFast. Changes to a read-only lower device fail with ErrReadOnly.
//
// Injected errors fail the whole call: a failed read fills nothing, a failed change
// changes nothing. A Faulty is safe for concurrent use, also while faults are switched
// on and off; it serializes its calls (the lower device included) under one mutex, which
// keeps it obviously correct at the cost of speed.
type Faulty struct {
	mu       sync.Mutex
	lower    Device
	closed   bool
	vanished bool
	faults   []fault // in the order injected; the first that matches a call fails it
	nextID   int
	flushErr error
	cache    []cacheOp
	unit     int64 // atomic write unit of PowerCutRandom
	stats    FaultyStats

	// hang, while not nil, blocks every call before it takes mu (see Hang).
	hangMu sync.Mutex
	hang   *hangGate
	hung   atomic.Int64 // calls blocked by hang now
}

// hangGate is one Hang: calls wait until release closes open.
type hangGate struct {
	open chan struct{}
	once sync.Once
}

// FaultyStats count the calls a Faulty device received, failed ones included.
type FaultyStats struct {
	Reads, Writes, FUAWrites, Flushes, Trims, WriteZeroes int64
	// Failed counts the calls that returned an error (io.EOF at the end aside).
	Failed int64
	// Cached is the number of changes in the volatile cache, not yet durable.
	Cached int
	// Hung is the number of calls blocked by Hang right now.
	Hung int
}

type fault struct {
	id     int
	off, n int64
	ops    FaultOp
	err    error
}

type cacheKind uint8

const (
	cacheWrite cacheKind = iota
	cacheZero
	cacheTrim
)

// cacheOp is one change held in the volatile cache.
type cacheOp struct {
	kind    cacheKind
	off, n  int64
	data    []byte    // cacheWrite: a copy of the bytes written
	flags   ZeroFlags // cacheZero
	durable bool      // written through to the lower device already (FUA)
}

var (
	_ Device       = (*Faulty)(nil)
	_ Trimmer      = (*Faulty)(nil)
	_ ZeroWriter   = (*Faulty)(nil)
	_ FUAWriter    = (*Faulty)(nil)
	_ BlockSizer   = (*Faulty)(nil)
	_ CapsReporter = (*Faulty)(nil)
)

// NewFaulty returns a Faulty device over lower, with an empty cache and no faults.
func NewFaulty(lower Device) *Faulty {
	return &Faulty{lower: lower, unit: PowerCutSector}
}

// Lower returns the lower device. Reading it shows what is durable; changing it behind
// the Faulty's back is allowed only while the cache is empty.
func (f *Faulty) Lower() Device { return f.lower }

// InjectError makes every call of the kinds in ops that touches [off, off+n) fail with
// an error wrapping err, or a medium error (ErrMedium and syscall.EIO) when err is nil,
// until the returned function removes the fault (removing it twice is harmless). An
// errno gets its class (Classify: syscall.ENODEV is ErrGone). Several faults may be
// active at once; where they overlap, the one injected first decides the error. It
// panics on a negative range or an empty ops.
func (f *Faulty) InjectError(off, n int64, ops FaultOp, err error) (remove func()) {
	if off < 0 || n < 0 || ops&^FaultReadWrite != 0 || ops == 0 {
		panic(fmt.Sprintf("blockdev: Faulty.InjectError(%d, %d, %#x): bad range or operations", off, n, ops))
	}
	if err == nil {
		err = syscall.EIO
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	id := f.nextID
	f.nextID++
	f.faults = append(f.faults, fault{id: id, off: off, n: n, ops: ops, err: err})
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.faults = slices.DeleteFunc(f.faults, func(ft fault) bool { return ft.id == id })
	}
}

// FailFlush makes Flush fail with an error wrapping err, or a medium error (ErrMedium
// and syscall.EIO) when err is nil, without writing anything back, until the returned
// function removes the fault. An errno gets its class, as with InjectError.
func (f *Faulty) FailFlush(err error) (remove func()) {
	if err == nil {
		err = syscall.EIO
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.flushErr = err
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.flushErr = nil
	}
}

// ClearFaults removes every injected error, FailFlush included. It does not Reinsert.
func (f *Faulty) ClearFaults() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.faults = nil
	f.flushErr = nil
}

// SetAtomicUnit sets the unit in which PowerCutRandom keeps or loses changes: the
// drive's physical sector, written all or nothing. It panics unless unit is a power of
// two of at least PowerCutSector.
func (f *Faulty) SetAtomicUnit(unit int64) {
	if unit < PowerCutSector || !isPowerOfTwo(unit) {
		panic(fmt.Sprintf("faulty: atomic unit %d is not a power of two of at least %d", unit, PowerCutSector))
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.unit = unit
}

// Vanish makes every call but Size, Caps and Close fail with an error wrapping
// ErrVanished (so ErrGone) and syscall.ENODEV, as on a pulled drive, until Reinsert.
func (f *Faulty) Vanish() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.vanished = true
}

// Reinsert brings a vanished device back, with the contents it had when it vanished.
func (f *Faulty) Reinsert() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.vanished = false
}

// Hang makes every call but Size, Caps, Close and the power cuts block, before it does
// anything, until release is called (calling it again is harmless); the blocked calls
// then run as if they had just been made. Stats().Hung counts the calls blocked. Hang
// while hanging returns the release of the hang in place.
func (f *Faulty) Hang() (release func()) {
	f.hangMu.Lock()
	defer f.hangMu.Unlock()
	g := f.hang
	if g == nil {
		g = &hangGate{open: make(chan struct{})}
		f.hang = g
	}
	return func() {
		g.once.Do(func() {
			f.hangMu.Lock()
			if f.hang == g {
				f.hang = nil
			}
			f.hangMu.Unlock()
			close(g.open)
		})
	}
}

// wait blocks while a Hang is in place. The caller does not hold mu.
func (f *Faulty) wait() {
	f.hangMu.Lock()
	g := f.hang
	f.hangMu.Unlock()
	if g == nil {
		return
	}
	f.hung.Add(1)
	<-g.open
	f.hung.Add(-1)
}

// Stats returns the counters.
func (f *Faulty) Stats() FaultyStats {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.stats
	s.Hung = int(f.hung.Load())
	for _, op := range f.cache {
		if !op.durable {
			s.Cached++
		}
	}
	return s
}

// PowerCut loses every change not made durable by a completed Flush or by WriteAtFUA.
// It works on a vanished device too.
func (f *Faulty) PowerCut() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return fmt.Errorf("faulty power cut: %w", ErrClosed)
	}
	// FUA writes are on the lower device already, and nothing kept is older than them.
	f.cache = nil
	return nil
}

// PowerCutRandom is PowerCut on a drive that had written back part of its cache, in no
// particular order: each 512-byte sector (or atomic unit, see SetAtomicUnit) changed
// since the last Flush ends up holding one of the contents it had since then (the
// durable one, or the one after any of the changes to it, but none older than a FUA
// write to it), chosen by a generator seeded with seed. It returns an error only if the
// lower device fails.
func (f *Faulty) PowerCutRandom(seed uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return fmt.Errorf("faulty power cut: %w", ErrClosed)
	}
	cache := f.cache
	f.cache = nil
	unit := f.unit

	// The contents each sector had, oldest first. The first is read from the lower
	// device, which holds the FUA writes already; it can only be chosen for a sector
	// that no FUA write touched, where it is the durable contents.
	type history struct {
		versions [][]byte
		floor    int // index of the first version that may be chosen
	}
	sectors := map[int64]*history{}
	var order []int64 // sectors in the order first touched, for a reproducible choice
	size := f.lower.Size()
	for _, op := range cache {
		for s := op.off / unit; s*unit < op.off+op.n; s++ {
			start := s * unit
			h := sectors[s]
			if h == nil {
				img := make([]byte, min(unit, size-start))
				if _, err := f.lower.ReadAt(img, start); err != nil && err != io.EOF {
					return fmt.Errorf("faulty power cut: %w", err)
				}
				h = &history{versions: [][]byte{img}}
				sectors[s] = h
				order = append(order, s)
			}
			img := bytes.Clone(h.versions[len(h.versions)-1])
			from, to := max(op.off, start), min(op.off+op.n, start+int64(len(img)))
			if op.kind == cacheWrite {
				copy(img[from-start:to-start], op.data[from-op.off:])
			} else {
				clear(img[from-start : to-start])
			}
			h.versions = append(h.versions, img)
			if op.durable {
				h.floor = len(h.versions) - 1
			}
		}
	}
	rng := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	for _, s := range order {
		h := sectors[s]
		v := h.versions[h.floor+rng.IntN(len(h.versions)-h.floor)]
		if _, err := f.lower.WriteAt(v, s*unit); err != nil {
			return fmt.Errorf("faulty power cut: %w", err)
		}
	}
	if err := f.lower.Flush(); err != nil {
		return fmt.Errorf("faulty power cut: %w", err)
	}
	return nil
}

// apply makes op on the lower device. The caller holds mu.
func (f *Faulty) apply(op cacheOp) error {
	switch op.kind {
	case cacheWrite:
		_, err := f.lower.WriteAt(op.data, op.off)
		return err
	case cacheZero:
		return WriteZeroes(f.lower, op.off, op.n, op.flags&^ZeroFast)
	case cacheTrim:
		// A lower device that turns out unable to trim (its Caps changed) keeps its
		// contents, which Trim allows; failing every later Flush over it would not.
		if err := Trim(f.lower, op.off, op.n); err != nil && !errors.Is(err, ErrNotSupported) {
			return err
		}
		return nil
	}
	panic("BUG: unknown cache operation")
}

// writeBack applies the cache to the lower device in order and empties it; after an
// error the changes not yet applied stay cached. The caller holds mu.
func (f *Faulty) writeBack() error {
	for i, op := range f.cache {
		if err := f.apply(op); err != nil {
			f.cache = f.cache[i:]
			return err
		}
	}
	f.cache = nil
	return nil
}

// check returns the error of a call of kind op on [off, off+n), if it must fail before
// it reaches the cache or the lower device. The caller holds mu.
func (f *Faulty) check(name string, op FaultOp, off, n int64) error {
	if f.closed {
		return fmt.Errorf("faulty %s: %w", name, ErrClosed)
	}
	if f.vanished {
		return fmt.Errorf("faulty %s at offset %d: %w: %w", name, off, ErrVanished, syscall.ENODEV)
	}
	for _, ft := range f.faults {
		if ft.ops&op != 0 && off < ft.off+ft.n && ft.off < off+n {
			return fmt.Errorf("faulty %s at offset %d length %d: injected error: %w", name, off, n, Classify(ft.err))
		}
	}
	return nil
}

// fail counts a failed call and returns err.
func (f *Faulty) fail(err error) error {
	f.stats.Failed++
	return err
}

// Size returns the size of the lower device.
func (f *Faulty) Size() int64 { return f.lower.Size() }

// PreferredBlockSize returns the lower device's.
func (f *Faulty) PreferredBlockSize() int { return PreferredBlockSize(f.lower) }

// Caps are the lower device's, except that the cache zeroes by itself and makes FUA
// writes (through blockdev.WriteFUA on the lower device) whatever the lower device can.
func (f *Faulty) Caps() Caps {
	c := CapsOf(f.lower)
	if c.ReadOnly {
		return c
	}
	c.Zeroes, c.FUA = true, true
	return c
}

// ReadAt reads the lower device with the cache laid over it.
func (f *Faulty) ReadAt(p []byte, off int64) (int, error) {
	f.wait()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stats.Reads++
	if err := f.check("read", FaultRead, off, int64(len(p))); err != nil {
		return 0, f.fail(err)
	}
	n, err := f.lower.ReadAt(p, off)
	for _, op := range f.cache {
		from, to := max(op.off, off), min(op.off+op.n, off+int64(n))
		if from >= to {
			continue
		}
		dst := p[from-off : to-off]
		if op.kind == cacheWrite {
			copy(dst, op.data[from-op.off:])
		} else {
			clear(dst)
		}
	}
	if err != nil && err != io.EOF {
		f.stats.Failed++
	}
	return n, err
}

// WriteAt puts the write in the cache.
func (f *Faulty) WriteAt(p []byte, off int64) (int, error) {
	f.wait()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stats.Writes++
	if err := f.checkChange("write", off, int64(len(p))); err != nil {
		return 0, f.fail(err)
	}
	if len(p) > 0 {
		f.cache = append(f.cache, cacheOp{kind: cacheWrite, off: off, n: int64(len(p)), data: bytes.Clone(p)})
	}
	return len(p), nil
}

// checkChange is check for a change, with the range checked against the device.
func (f *Faulty) checkChange(name string, off, n int64) error {
	if err := f.check(name, FaultWrite, off, n); err != nil {
		return err
	}
	if err := CheckRange(off, n, f.lower.Size()); err != nil {
		return fmt.Errorf("faulty %s: %w", name, err)
	}
	if CapsOf(f.lower).ReadOnly {
		return fmt.Errorf("faulty %s: %w", name, ErrReadOnly)
	}
	return nil
}

// WriteAtFUA writes p through to the lower device durably, and into the cache.
func (f *Faulty) WriteAtFUA(p []byte, off int64) (int, error) {
	f.wait()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stats.FUAWrites++
	if err := f.checkChange("FUA write", off, int64(len(p))); err != nil {
		return 0, f.fail(err)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if n, err := WriteFUA(f.lower, p, off); err != nil {
		return n, f.fail(fmt.Errorf("faulty FUA write: %w", err))
	}
	f.cache = append(f.cache, cacheOp{kind: cacheWrite, off: off, n: int64(len(p)), data: bytes.Clone(p), durable: true})
	return len(p), nil
}

// Trim puts a trim in the cache; the range reads as zeroes until Flush passes it on.
func (f *Faulty) Trim(off, n int64) error {
	f.wait()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stats.Trims++
	if err := f.checkChange("trim", off, n); err != nil {
		return f.fail(err)
	}
	if !CapsOf(f.lower).Trim {
		return f.fail(fmt.Errorf("faulty trim: %w", ErrNotSupported))
	}
	if n > 0 {
		f.cache = append(f.cache, cacheOp{kind: cacheTrim, off: off, n: n})
	}
	return nil
}

// WriteZeroes puts a zeroing in the cache.
func (f *Faulty) WriteZeroes(off, n int64, flags ZeroFlags) error {
	f.wait()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stats.WriteZeroes++
	if err := f.checkChange("write zeroes", off, n); err != nil {
		return f.fail(err)
	}
	if flags&ZeroFast != 0 && !CapsOf(f.lower).FastZero {
		return f.fail(fmt.Errorf("faulty write zeroes: %w", ErrNotFast))
	}
	if n > 0 {
		f.cache = append(f.cache, cacheOp{kind: cacheZero, off: off, n: n, flags: flags})
	}
	return nil
}

// Flush writes the cache back to the lower device and flushes it.
func (f *Faulty) Flush() error {
	f.wait()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stats.Flushes++
	if err := f.check("flush", 0, 0, 0); err != nil {
		return f.fail(err)
	}
	if f.flushErr != nil {
		return f.fail(fmt.Errorf("faulty flush: injected error: %w", Classify(f.flushErr)))
	}
	if err := f.writeBack(); err != nil {
		return f.fail(fmt.Errorf("faulty flush: %w", err))
	}
	if err := f.lower.Flush(); err != nil {
		return f.fail(fmt.Errorf("faulty flush: %w", err))
	}
	return nil
}

// Close writes the cache back to the lower device, without flushing it, and closes it.
// It works on a vanished device too.
func (f *Faulty) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return fmt.Errorf("faulty close: %w", ErrClosed)
	}
	f.closed = true
	errBack := f.writeBack()
	if errBack != nil {
		errBack = fmt.Errorf("faulty close: writing the cache back: %w", errBack)
	}
	return errors.Join(errBack, f.lower.Close())
}
