package nbd

import (
	"sync"
	"sync/atomic"
)

// replayLog keeps the changing requests (writes, trims, zeroes) from the moment they
// are sent until a Flush that started after they were answered succeeds, so that a
// reconnect can send them again, in order, to a server that may have lost them.
//
// Entries are added before the request goes out, not when it is answered: a write
// answered just before a connection drops is then never missing from a replay.
// Replaying a write that is also retried is harmless (same data, same offset).
//
// The copies of write payloads come from the package's buffer pool and go back to it when
// their entry is dropped, so that a busy writer does not allocate (and the garbage
// collector clear) a new buffer per write. A replay reads the buffers of the entries it
// took (snapshot) without the lock, while a Flush that succeeded just before the
// connection dropped may drop those entries: so while a replay runs, dropped buffers
// are parked, and they go back to the pool when the last replay ends.
type replayLog struct {
	limit        int64 // bytes; negative: no log, only the lost-write bookkeeping
	autoFlushing atomic.Bool

	mu       sync.Mutex
	entries  []*logEntry
	bytes    int64
	flushGen uint64
	lost     bool      // writes may have been lost; the next Flush says so
	replays  int       // replays running (snapshot taken, endReplay not yet called)
	parked   []*[]byte // buffers of entries dropped while a replay ran

	// Without a log: writes answered, and writes covered by a successful flush.
	acked, flushedAcked uint64
}

type logEntry struct {
	typ     uint16
	flags   uint16
	off     uint64
	length  uint32
	data    *[]byte // WRITE payload copy, pooled
	state   entryState
	doneGen uint64 // flushGen when it was answered
}

type entryState uint8

const (
	entryPending entryState = iota
	entryDone
	entryFailed
)

const entryOverhead = 64 // bytes counted per entry besides its data

// flushMark is what a Flush remembers from its start.
type flushMark struct {
	gen   uint64
	acked uint64
}

// add records cl before it is sent.
func (l *replayLog) add(cl *call) *logEntry {
	if l.limit < 0 {
		return nil
	}
	// A fast zero either zeroes (replayed as a plain write-zeroes) or changes nothing.
	e := &logEntry{typ: cl.typ, flags: cl.flags &^ cmdFlagFastZero, off: cl.off, length: cl.length}
	n := int64(0)
	if cl.typ == cmdWrite {
		e.data = getBuf(len(cl.buf))
		copy(*e.data, cl.buf)
		n = int64(len(cl.buf))
	}
	l.mu.Lock()
	l.entries = append(l.entries, e)
	l.bytes += n + entryOverhead
	l.mu.Unlock()
	return e
}

// dropLocked gives back the buffer of an entry taken out of the log.
func (l *replayLog) dropLocked(e *logEntry) {
	if e.data == nil {
		return
	}
	l.bytes -= int64(len(*e.data))
	if l.replays > 0 {
		l.parked = append(l.parked, e.data)
	} else {
		putBuf(e.data)
	}
	e.data = nil
}

// finish records the outcome of the request of e.
func (l *replayLog) finish(e *logEntry, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e == nil {
		if err == nil {
			l.acked++
		}
		return
	}
	e.doneGen = l.flushGen
	e.state = entryDone
	if err != nil {
		// The caller saw the error, so the range is unspecified anyway (a refused fast
		// zero changed nothing): nothing to replay.
		e.state = entryFailed
	}
}

// full reports whether the log holds more than its limit.
func (l *replayLog) full() bool {
	if l.limit < 0 {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.bytes > l.limit
}

func (l *replayLog) startFlush() flushMark {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.flushGen++
	return flushMark{gen: l.flushGen, acked: l.acked}
}

// flushed drops what a successful Flush that began at m covered: entries answered
// before it began. It reports, once, whether writes may have been lost before.
func (l *replayLog) flushed(m flushMark) (lost bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	kept := l.entries[:0]
	for _, e := range l.entries {
		if e.state != entryPending && e.doneGen < m.gen {
			l.bytes -= entryOverhead
			l.dropLocked(e)
			continue
		}
		kept = append(kept, e)
	}
	clear(l.entries[len(kept):])
	l.entries = kept
	l.flushedAcked = max(l.flushedAcked, m.acked)
	lost, l.lost = l.lost, false
	return lost
}

// replayEntry is what a replay sends for one entry.
type replayEntry struct {
	typ, flags uint16
	off        uint64
	length     uint32
	data       []byte
}

// snapshot returns the entries to replay, in the order they were sent. Their data stays
// valid until the caller calls endReplay.
func (l *replayLog) snapshot() []replayEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.replays++
	out := make([]replayEntry, 0, len(l.entries))
	for _, e := range l.entries {
		if e.state != entryFailed {
			r := replayEntry{typ: e.typ, flags: e.flags, off: e.off, length: e.length}
			if e.data != nil {
				r.data = *e.data
			}
			out = append(out, r)
		}
	}
	return out
}

// endReplay ends the use of a snapshot's data.
func (l *replayLog) endReplay() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.replays--; l.replays < 0 {
		panic("BUG: nbd: endReplay without snapshot")
	}
	if l.replays == 0 {
		for _, b := range l.parked {
			putBuf(b)
		}
		clear(l.parked)
		l.parked = l.parked[:0]
	}
}

// unflushed counts the changing requests that no successful Flush covers yet (sent or
// answered, not failed) and the bytes they change; without a log, it counts the writes
// answered since the last Flush and bytes is -1 (unknown).
func (l *replayLog) unflushed() (n int, bytes int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.limit < 0 {
		return int(l.acked - l.flushedAcked), -1
	}
	for _, e := range l.entries {
		if e.state != entryFailed {
			n++
			bytes += int64(e.length)
		}
	}
	return n, bytes
}

// droppedDirty reports, for a connection that just dropped, whether answered writes
// that no log keeps were not yet flushed.
func (l *replayLog) droppedDirty() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.limit < 0 && l.acked > l.flushedAcked
}

// dropAll empties the log when it cannot be flushed; the next Flush reports it.
func (l *replayLog) dropAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.entries) > 0 {
		l.lost = true
	}
	for _, e := range l.entries {
		l.dropLocked(e)
	}
	clear(l.entries)
	l.entries = l.entries[:0]
	l.bytes = 0
}

func (l *replayLog) setLost() {
	l.mu.Lock()
	l.lost = true
	l.mu.Unlock()
}
