package blockdev

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Bounded is a Device whose every call returns within a time limit: a watchdog over a
// lower device that may hang (see Bound).
type Bounded struct {
	lower Device
	limit time.Duration
	stuck atomic.Int64 // calls that timed out and still run below

	// mu is held shared by every call while it waits and exclusively by Close.
	mu     sync.RWMutex
	closed bool
}

var (
	_ Device       = (*Bounded)(nil)
	_ Trimmer      = (*Bounded)(nil)
	_ ZeroWriter   = (*Bounded)(nil)
	_ FUAWriter    = (*Bounded)(nil)
	_ BlockSizer   = (*Bounded)(nil)
	_ CapsReporter = (*Bounded)(nil)
)

// Bound returns dev with a time limit on each call: a call that has not returned after
// limit fails with an error wrapping ErrTimeout, while the call to dev goes on in the
// background and its result is dropped. Bounded owns dev: its Close closes dev (within
// the limit too). It panics unless limit is positive.
//
// A read goes to dev through a private buffer, copied into the caller's on success, so
// the caller's buffer is never written after ReadAt returned, whatever dev does later.
// A write's data is copied into a private buffer before it goes down, so dev never
// reads the caller's buffer after WriteAt returned either (io.WriterAt must not retain
// it). But a change that timed out (WriteAt, WriteAtFUA, Trim, WriteZeroes, and Flush)
// may still take effect afterwards, at any time: the caller must treat that range of
// dev (all of it, after a Flush) as unknown until it writes it again. A mirror marks the
// member failed and the region dirty, which it does for any failed write anyway.
//
// Size, Caps and PreferredBlockSize are dev's and not bounded: no Device does I/O for
// them. Every bounded call runs on a goroutine of its own; one that never returns keeps
// its goroutine and buffer (see Stuck).
func Bound(dev Device, limit time.Duration) *Bounded {
	if limit <= 0 {
		panic(fmt.Sprintf("blockdev: Bound with a limit of %v", limit))
	}
	return &Bounded{lower: dev, limit: limit}
}

// Lower returns the bounded device.
func (b *Bounded) Lower() Device { return b.lower }

// Limit returns the time limit of each call.
func (b *Bounded) Limit() time.Duration { return b.limit }

// Stuck returns how many calls timed out and have not returned from the lower device
// yet: each holds a goroutine and, for reads and writes, a buffer.
func (b *Bounded) Stuck() int { return int(b.stuck.Load()) }

// Size returns the lower device's size.
func (b *Bounded) Size() int64 { return b.lower.Size() }

// Caps returns the lower device's capabilities.
func (b *Bounded) Caps() Caps { return CapsOf(b.lower) }

// PreferredBlockSize returns the lower device's.
func (b *Bounded) PreferredBlockSize() int { return PreferredBlockSize(b.lower) }

// ReadAt reads through a private buffer; see Bound.
func (b *Bounded) ReadAt(p []byte, off int64) (int, error) {
	c := newBoundCall(opRead, off, int64(len(p)))
	c.buf = getBoundBuffer(len(p))
	n, owned, err := b.run(c)
	if owned {
		copy(p, (*c.buf)[:n])
		c.release()
	}
	return n, err
}

// WriteAt writes a private copy of p; see Bound.
func (b *Bounded) WriteAt(p []byte, off int64) (int, error) {
	return b.write(opWrite, p, off)
}

// WriteAtFUA writes a private copy of p durably (blockdev.WriteFUA on the lower
// device); see Bound.
func (b *Bounded) WriteAtFUA(p []byte, off int64) (int, error) {
	return b.write(opWriteFUA, p, off)
}

func (b *Bounded) write(op boundOp, p []byte, off int64) (int, error) {
	c := newBoundCall(op, off, int64(len(p)))
	c.buf = getBoundBuffer(len(p))
	copy(*c.buf, p)
	n, owned, err := b.run(c)
	if owned {
		c.release()
	}
	return n, err
}

// Trim trims the lower device (blockdev.Trim).
func (b *Bounded) Trim(off, n int64) error {
	return b.simple(newBoundCall(opTrim, off, n))
}

// WriteZeroes zeroes on the lower device (blockdev.WriteZeroes).
func (b *Bounded) WriteZeroes(off, n int64, flags ZeroFlags) error {
	c := newBoundCall(opZero, off, n)
	c.flags = flags
	return b.simple(c)
}

// Flush flushes the lower device.
func (b *Bounded) Flush() error {
	return b.simple(newBoundCall(opFlush, 0, 0))
}

// simple runs a call without a buffer.
func (b *Bounded) simple(c *boundCall) error {
	_, owned, err := b.run(c)
	if owned {
		c.release()
	}
	return err
}

// Close waits for the calls in progress (each at most the limit), then closes the
// lower device within the limit. Every later call fails with ErrClosed.
func (b *Bounded) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return fmt.Errorf("close: %w", ErrClosed)
	}
	b.closed = true
	c := newBoundCall(opClose, 0, 0)
	_, owned, err := b.wait(c)
	if owned {
		c.release()
	}
	return err
}

// run runs c on the lower device unless b is closed; see wait.
func (b *Bounded) run(c *boundCall) (n int, owned bool, err error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.closed {
		return 0, true, fmt.Errorf("%s: %w", c.op, ErrClosed) // never started
	}
	return b.wait(c)
}

// wait starts c on a goroutine of its own and waits for it at most the limit. When c
// finished in time, the caller owns it again (owned) and releases it; otherwise the
// goroutine releases it when the lower call returns, and the caller must not touch it.
func (b *Bounded) wait(c *boundCall) (n int, owned bool, err error) {
	go b.exec(c)
	t := timerPool.Get().(*time.Timer)
	t.Reset(b.limit)
	defer func() {
		t.Stop()
		timerPool.Put(t)
	}()
	select {
	case <-c.done:
		return c.n, true, c.err
	case <-t.C:
	}
	b.stuck.Add(1)
	if !c.state.CompareAndSwap(callRunning, callAbandoned) {
		// It finished as the timer fired.
		b.stuck.Add(-1)
		<-c.done
		return c.n, true, c.err
	}
	if c.op == opFlush || c.op == opClose {
		err = fmt.Errorf("%s: %w (limit %v)", c.op, ErrTimeout, b.limit)
	} else {
		err = fmt.Errorf("%s at offset %d length %d: %w (limit %v)", c.op, c.off, c.len, ErrTimeout, b.limit)
	}
	return 0, false, err
}

// exec makes c's call on the lower device and hands the result over, or, if the
// caller gave up waiting, drops it.
func (b *Bounded) exec(c *boundCall) {
	switch c.op {
	case opRead:
		c.n, c.err = b.lower.ReadAt(*c.buf, c.off)
	case opWrite:
		c.n, c.err = b.lower.WriteAt(*c.buf, c.off)
	case opWriteFUA:
		c.n, c.err = WriteFUA(b.lower, *c.buf, c.off)
	case opTrim:
		c.err = Trim(b.lower, c.off, c.len)
	case opZero:
		c.err = WriteZeroes(b.lower, c.off, c.len, c.flags)
	case opFlush:
		c.err = b.lower.Flush()
	case opClose:
		c.err = b.lower.Close()
	}
	if c.state.CompareAndSwap(callRunning, callFinished) {
		c.done <- struct{}{}
		return
	}
	b.stuck.Add(-1)
	c.release()
}

type boundOp uint8

const (
	opRead boundOp = iota
	opWrite
	opWriteFUA
	opTrim
	opZero
	opFlush
	opClose
)

func (o boundOp) String() string {
	return [...]string{"read", "write", "FUA write", "trim", "write zeroes", "flush", "close"}[o]
}

// Call states: a call runs until it finishes or its caller abandons it, whichever
// comes first (a compare-and-swap decides).
const (
	callRunning int32 = iota
	callFinished
	callAbandoned
)

// boundCall is one call of a Bounded, shared by its caller and the goroutine that
// makes it; whoever is last releases it.
type boundCall struct {
	state atomic.Int32
	done  chan struct{} // receives once when the call finished in time
	op    boundOp
	off   int64
	len   int64
	flags ZeroFlags
	buf   *[]byte // reads and writes: the private buffer
	n     int
	err   error
}

var boundCalls = sync.Pool{New: func() any { return &boundCall{done: make(chan struct{}, 1)} }}

func newBoundCall(op boundOp, off, n int64) *boundCall {
	c := boundCalls.Get().(*boundCall)
	c.op, c.off, c.len = op, off, n
	return c
}

// release returns c and its buffer to their pools. Its done channel is empty: a call
// that finished in time sent once and was received once, an abandoned one never sent.
func (c *boundCall) release() {
	if c.buf != nil {
		putBoundBuffer(c.buf)
	}
	c.state.Store(callRunning)
	c.flags, c.buf, c.n, c.err = 0, nil, 0, nil
	boundCalls.Put(c)
}

var timerPool = sync.Pool{New: func() any {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return t
}}

// The private buffers of Bounded, in size classes of 4 KiB times a power of 16, aligned
// for O_DIRECT; larger ones are allocated for the call.
var boundBufferClasses = [...]struct {
	size int
	pool sync.Pool
}{{size: 4 << 10}, {size: 64 << 10}, {size: 1 << 20}, {size: 16 << 20}}

// getBoundBuffer returns a buffer of n bytes.
func getBoundBuffer(n int) *[]byte {
	for i := range boundBufferClasses {
		c := &boundBufferClasses[i]
		if n <= c.size {
			b, _ := c.pool.Get().(*[]byte)
			if b == nil {
				nb := AlignedBuffer(c.size)
				b = &nb
			}
			*b = (*b)[:n]
			return b
		}
	}
	b := AlignedBuffer(n)
	return &b
}

// putBoundBuffer returns a buffer to its class, or drops one that has none.
func putBoundBuffer(b *[]byte) {
	full := (*b)[:cap(*b)]
	for i := range boundBufferClasses {
		if c := &boundBufferClasses[i]; len(full) == c.size {
			*b = full
			c.pool.Put(b)
			return
		}
	}
}
