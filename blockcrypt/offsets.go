package blockcrypt

// Offset arithmetic of the encrypted region, in one place (see offsets_test.go).
//
// Three coordinate systems meet here:
//   - region offsets: 0 .. size, what the Device's callers see;
//   - lower offsets: base + region offset, where the ciphertext lives on the lower device;
//   - IVs: ivTweak + region offset / 512, in 512-byte units whatever the sector size
//     (LUKS2 aes-xts-plain64 as cryptsetup does it), wrapping modulo 2^64 like plain64.

// layout describes where the encrypted region lies and how it is cut into sectors.
type layout struct {
	base       int64  // lower offset of the region's first byte
	size       int64  // region size in bytes, a multiple of sectorSize
	sectorSize int64  // 512 or 4096
	ivTweak    uint64 // IV of the region's first sector, in 512-byte units
}

// span is a byte range [off, off+n) in region coordinates.
type span struct {
	off, n int64
}

func (s span) end() int64 { return s.off + s.n }

// split cuts [off, off+n) into a head that ends at the first sector boundary, a body
// of whole sectors, and a tail that starts at the last sector boundary. Head and tail
// each lie inside one sector and are partial (shorter than a sector) or empty; a range
// inside one sector that touches no boundary is all head. The caller has checked that
// the range lies in the region.
func (l layout) split(off, n int64) (head, body, tail span) {
	end := off + n
	first, last := l.alignUp(off), l.alignDown(end)
	if first > last {
		return span{off, n}, span{end, 0}, span{end, 0}
	}
	return span{off, first - off}, span{first, last - first}, span{last, end - last}
}

// sectorStart returns the region offset of the sector that holds region offset off.
func (l layout) sectorStart(off int64) int64 { return l.alignDown(off) }

// lowerOffset maps a region offset to the lower device.
func (l layout) lowerOffset(off int64) int64 { return l.base + off }

// iv returns the IV of the sector starting at region offset off (a sector boundary).
func (l layout) iv(off int64) uint64 {
	if off%l.sectorSize != 0 {
		panic("BUG: blockcrypt: IV asked for an offset inside a sector")
	}
	return l.ivTweak + uint64(off)/512
}

func (l layout) alignDown(x int64) int64 { return x - x%l.sectorSize }

func (l layout) alignUp(x int64) int64 {
	if r := x % l.sectorSize; r != 0 {
		return x + l.sectorSize - r
	}
	return x
}

// lockUnit is the granularity of the sector lock table: region offsets in the same
// lockUnit share a lock. Bigger than a sector so that a 1 MiB request takes 64 locks,
// not 256 or 2048; a read-modify-write then holds up the I/O of the 16 KiB around it,
// which is harmless because partial-sector writes are rare (file systems write whole
// blocks).
const lockUnit = 16 << 10

// lockKeys returns the first lock key and the number of keys that [off, off+n) covers
// (n > 0).
func lockKeys(off, n int64) (first, count int64) {
	first = off / lockUnit
	return first, (off+n-1)/lockUnit - first + 1
}
