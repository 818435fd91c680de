package slot

import (
	"errors"
	"fmt"
	"sync"

	"github.com/atrest/atrest/blockdev"
)

// The replay log: the changes answered but not yet flushed, in the order they were
// answered, so that a drive that lost them when it was pulled (its volatile cache, the
// page cache of a loop device's file) gets them again when it returns. See the package
// doc for what it is for and what it costs.

// logKind is the kind of change an entry replays.
type logKind uint8

const (
	logWrite logKind = iota
	logZero
	logTrim
)

func (k logKind) String() string {
	return [...]string{"write", "write zeroes", "trim"}[k]
}

// entry is one change in the log.
type entry struct {
	seq    uint64
	kind   logKind
	flags  blockdev.ZeroFlags // logZero, without ZeroFast
	off, n int64
	data   record // logWrite
}

// entryOverhead is what an entry costs beside its data, counted against the limit so
// that a flood of trims or zeroings cannot grow the log without bound either.
const entryOverhead = 128

// record is a copy of a write's data in pooled chunks: the first in place (most writes
// fit one chunk, and then cost no allocation), the others in rest.
type record struct {
	first *[]byte
	rest  []*[]byte
}

// The chunk classes: 4 KiB to 1 MiB, powers of 4. A write is cut into chunks of the
// largest class that it fills, the last one of the smallest class that holds the rest:
// one copy, at most three chunks per class, under 4 KiB left unused. The chunks are
// not aligned for O_DIRECT (blockdev.AlignedBuffer would take twice the memory for 4
// KiB): a replay is rare, and a drive opened with O_DIRECT copies through its bounce
// buffer then.
var chunkClasses = [...]struct {
	size int
	pool sync.Pool
}{{size: 4 << 10}, {size: 16 << 10}, {size: 64 << 10}, {size: 256 << 10}, {size: 1 << 20}}

func getChunk(class int) *[]byte {
	c := &chunkClasses[class]
	if b, _ := c.pool.Get().(*[]byte); b != nil {
		return b
	}
	b := make([]byte, c.size)
	return &b
}

func putChunk(b *[]byte) {
	full := (*b)[:cap(*b)]
	for i := range chunkClasses {
		if c := &chunkClasses[i]; len(full) == c.size {
			*b = full
			c.pool.Put(b)
			return
		}
	}
}

// classFor returns the class of the next chunk for n bytes still to copy.
func classFor(n int) int {
	for i := len(chunkClasses) - 1; i > 0; i-- {
		if n >= chunkClasses[i].size {
			return i
		}
	}
	for i := range chunkClasses {
		if n <= chunkClasses[i].size {
			return i
		}
	}
	panic("BUG: slot: no chunk class")
}

// copyRecord copies p into pooled chunks.
func copyRecord(p []byte) record {
	var r record
	for len(p) > 0 {
		b := getChunk(classFor(len(p)))
		n := copy(*b, p)
		*b = (*b)[:n]
		p = p[n:]
		if r.first == nil {
			r.first = b
		} else {
			r.rest = append(r.rest, b)
		}
	}
	return r
}

// chunks calls fn with each chunk of r in order until fn fails.
func (r record) chunks(fn func(b []byte) error) error {
	if r.first == nil {
		return nil
	}
	if err := fn(*r.first); err != nil {
		return err
	}
	for _, b := range r.rest {
		if err := fn(*b); err != nil {
			return err
		}
	}
	return nil
}

// release returns r's chunks to their pools; r must not be used afterwards.
func (r record) release() {
	if r.first == nil {
		return
	}
	putChunk(r.first)
	for _, b := range r.rest {
		putChunk(b)
	}
}

// replayLog holds the entries. Its mutex is also the one under which the slot changes
// its current drive, so that an entry appended while a drive is current is in the log
// before that drive goes, and a drop after a flush is done only on the drive that
// flushed (see Slot).
type replayLog struct {
	mu      sync.Mutex
	entries []entry
	next    uint64 // seq of the next entry
	bytes   int64  // data of the write entries
	lo, hi  int64  // the span of every entry's range, when there are entries
}

// add appends e with the next seq. The caller holds mu.
func (l *replayLog) add(e entry) {
	e.seq = l.next
	l.next++
	if len(l.entries) == 0 {
		l.lo, l.hi = e.off, e.off+e.n
	} else {
		l.lo, l.hi = min(l.lo, e.off), max(l.hi, e.off+e.n)
	}
	l.entries = append(l.entries, e)
	if e.kind == logWrite {
		l.bytes += e.n
	}
}

// cost is what the log holds, as counted against the limit. The caller holds mu.
func (l *replayLog) cost() int64 {
	return l.bytes + int64(len(l.entries))*entryOverhead
}

// overlaps reports whether [off, off+n) meets the span of the entries. The caller holds
// mu.
func (l *replayLog) overlaps(off, n int64) bool {
	return len(l.entries) > 0 && off < l.hi && l.lo < off+n
}

// dropBefore drops the entries older than mark and returns their chunks to the pools.
// The caller holds mu, and no replay uses them (the slot replays only while no drive is
// current, and drops only on a current one).
func (l *replayLog) dropBefore(mark uint64) {
	k := 0
	for k < len(l.entries) && l.entries[k].seq < mark {
		if l.entries[k].kind == logWrite {
			l.bytes -= l.entries[k].n
		}
		l.entries[k].data.release()
		k++
	}
	if k == 0 {
		return
	}
	n := copy(l.entries, l.entries[k:])
	clear(l.entries[n:])
	l.entries = l.entries[:n]
	for i, e := range l.entries {
		if i == 0 {
			l.lo, l.hi = e.off, e.off+e.n
		} else {
			l.lo, l.hi = min(l.lo, e.off), max(l.hi, e.off+e.n)
		}
	}
}

// forget drops every entry without returning its chunks to the pools: a replay may
// still be reading them (Close during a Reinsert). The caller holds mu.
func (l *replayLog) forget() {
	l.entries, l.bytes = nil, 0
}

// replay makes the changes of entries on dev in order. A trim that dev refuses with
// ErrNotSupported is skipped: after a trim the contents of the range are unspecified
// anyway.
func replay(dev blockdev.Device, entries []entry) error {
	for _, e := range entries {
		var err error
		switch e.kind {
		case logWrite:
			pos := e.off
			err = e.data.chunks(func(b []byte) error {
				_, err := dev.WriteAt(b, pos)
				pos += int64(len(b))
				return err
			})
		case logZero:
			err = blockdev.WriteZeroes(dev, e.off, e.n, e.flags)
		case logTrim:
			if err = blockdev.Trim(dev, e.off, e.n); errors.Is(err, blockdev.ErrNotSupported) {
				err = nil
			}
		}
		if err != nil {
			return fmt.Errorf("%s at offset %d length %d: %w", e.kind, e.off, e.n, err)
		}
	}
	return nil
}
