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
type replayLog struct {
	limit        int64 // bytes; negative: no log, only the lost-write bookkeeping
	autoFlushing atomic.Bool

	mu       sync.Mutex
	entries  []*logEntry
	bytes    int64
	seq      uint64
	flushGen uint64
	lost     bool // writes may have been lost; the next Flush says so

	// Without a log: writes answered, and writes covered by a successful flush.
	acked, flushedAcked uint64
}

type logEntry struct {
	seq     uint64
	typ     uint16
	flags   uint16
	off     uint64
	length  uint32
	data    []byte
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
	e := &logEntry{typ: cl.typ, flags: cl.flags &^ cmdFlagFastZero, off: cl.off, length: cl.length}
	if cl.typ == cmdWrite {
		e.data = append([]byte(nil), cl.buf...)
	}
	if cl.flags&cmdFlagFastZero != 0 {
		// A fast zero either zeroes (replayed as a plain write-zeroes) or changes nothing.
		e.flags &^= cmdFlagFastZero
	}
	l.mu.Lock()
	l.seq++
	e.seq = l.seq
	l.entries = append(l.entries, e)
	l.bytes += int64(len(e.data)) + entryOverhead
	l.mu.Unlock()
	return e
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
			l.bytes -= int64(len(e.data)) + entryOverhead
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

// snapshot returns the entries to replay, in the order they were sent.
func (l *replayLog) snapshot() []*logEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*logEntry, 0, len(l.entries))
	for _, e := range l.entries {
		if e.state != entryFailed {
			out = append(out, e)
		}
	}
	return out
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
	clear(l.entries)
	l.entries = l.entries[:0]
	l.bytes = 0
}

func (l *replayLog) setLost() {
	l.mu.Lock()
	l.lost = true
	l.mu.Unlock()
}
