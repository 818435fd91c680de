package fusefs

import (
	"math"
	"syscall"
)

// The arithmetic that fits requests into a file of fixed size. Kept apart from the
// FUSE plumbing so that it can be tested on its own.

// readSpan returns how many of n bytes at off can be read from a file of size bytes:
// none at or after the end, the bytes before the end for a read that crosses it.
func readSpan(off int64, n int, size int64) (int, syscall.Errno) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= size {
		return 0, 0
	}
	return int(min(int64(n), size-off)), 0
}

// writeSpan returns how many of n bytes at off can be written to a file of size bytes
// that never grows: ENOSPC at or after the end (for a non-empty write), the bytes
// before the end for a write that crosses it.
func writeSpan(off int64, n int, size int64) (int, syscall.Errno) {
	switch {
	case off < 0:
		return 0, syscall.EINVAL
	case n == 0:
		return 0, 0
	case off >= size:
		return 0, syscall.ENOSPC
	}
	return int(min(int64(n), size-off)), 0
}

// allocSpan fits the range of a fallocate call into a file of size bytes. Without
// keepSize the call would have to grow a file that reaches past the end: EFBIG. With
// keepSize the range is clipped to the file (it may become empty).
func allocSpan(off, length uint64, size int64, keepSize bool) (start, n int64, errno syscall.Errno) {
	if length == 0 || off > math.MaxInt64 || length > math.MaxInt64-off {
		return 0, 0, syscall.EINVAL // what fallocate(2) answers, before any FUSE request
	}
	end := int64(off + length)
	if end > size {
		if !keepSize {
			return 0, 0, syscall.EFBIG
		}
		end = size
	}
	if int64(off) >= end {
		return 0, 0, 0
	}
	return int64(off), end - int64(off), 0
}
