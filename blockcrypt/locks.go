package blockcrypt

import "sync"

// The sector lock table and what it guarantees.
//
// A partial-sector write is a read-modify-write (RMW) of the whole sector: it rewrites
// bytes that its caller did not write. Two rules follow, and the table enforces both:
//
//  1. Concurrent partial writes to one sector never lose each other's bytes, and a
//     whole-sector write concurrent with an RMW is not undone by the RMW writing back
//     the sector it read before. So an RMW holds its lock exclusively from its lower
//     read to its lower write, and every whole-sector write holds the locks it covers
//     shared around its lower write. Whole-sector writes need no exclusion among
//     themselves (they rewrite only bytes their callers write, and overlapping
//     concurrent writes may land in either order, as on a disk), so shared is enough,
//     and they take the locks only around the lower write, after encrypting.
//  2. A read never sees a sector half-written by an RMW: that would show garbage (a torn
//     ciphertext block decrypts to noise) in bytes that nobody is writing. So reads hold
//     the locks they cover shared around their lower read. A read concurrent with a
//     whole-sector write of the same bytes may see either version, or noise in a 16-byte
//     block where the lower device tears the write; those are bytes being written at
//     that moment, whose value is undefined on any disk.
//
// Trim takes no lock: it covers only whole sectors inside its range, whose contents are
// unspecified after it anyway, so it can disturb no byte outside that range.
//
// Locks are striped: lock key k (region offset / lockUnit, see offsets.go) maps to stripe
// k % lockStripes. A caller holds either one stripe exclusively (an RMW, which takes no
// other lock while it holds it) or a set of stripes shared, acquired in ascending stripe
// order; so there is no cycle and no deadlock. A call never holds two sets at once: the
// head, body and tail of a request are separate steps.
const lockStripes = 1024

type stripe struct {
	sync.RWMutex
	_ [64 - 24]byte // one cache line per stripe
}

type lockTable struct {
	s [lockStripes]stripe
}

// lock takes the stripe of key exclusively.
func (t *lockTable) lock(key int64) { t.s[key%lockStripes].Lock() }

func (t *lockTable) unlock(key int64) { t.s[key%lockStripes].Unlock() }

// rlock takes the stripes of keys first .. first+count-1 shared, in ascending order.
func (t *lockTable) rlock(first, count int64) {
	t.stripes(first, count, func(i int) { t.s[i].RLock() })
}

func (t *lockTable) runlock(first, count int64) {
	t.stripes(first, count, func(i int) { t.s[i].RUnlock() })
}

// stripes calls f for each stripe of keys first .. first+count-1 once, in ascending
// stripe order.
func (t *lockTable) stripes(first, count int64, f func(int)) {
	if count <= 0 {
		panic("BUG: blockcrypt: empty lock range")
	}
	if count >= lockStripes {
		for i := range lockStripes {
			f(i)
		}
		return
	}
	a := int(first % lockStripes)
	b := a + int(count) // exclusive end, may pass lockStripes
	if b > lockStripes {
		for i := range b - lockStripes {
			f(i)
		}
		b = lockStripes
	}
	for i := a; i < b; i++ {
		f(i)
	}
}
