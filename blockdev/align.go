package blockdev

import "unsafe"

// BufferAlign is the memory alignment of the buffers that AlignedBuffer returns. It is
// at least what O_DIRECT asks of memory on any Linux device (the page size here).
const BufferAlign = 4096

// AlignedBuffer returns a zeroed slice of n bytes whose first byte lies on a BufferAlign
// boundary. A File opened with FileOptions.Direct reads into and writes from such
// buffers without copying them through a bounce buffer, when the offset and length are
// aligned too.
func AlignedBuffer(n int) []byte {
	if n < 0 {
		panic("BUG: negative buffer size")
	}
	b := make([]byte, n+BufferAlign)
	skip := 0
	if r := int(uintptr(unsafe.Pointer(unsafe.SliceData(b))) % BufferAlign); r != 0 {
		skip = BufferAlign - r
	}
	return b[skip : skip+n : skip+n]
}

// isAligned reports whether the address of p's first byte is a multiple of align (a
// power of two). An empty slice is aligned.
func isAligned(p []byte, align int) bool {
	if len(p) == 0 {
		return true
	}
	return uintptr(unsafe.Pointer(unsafe.SliceData(p)))&uintptr(align-1) == 0
}

// alignDown rounds x down to a multiple of align (a power of two).
func alignDown(x, align int64) int64 { return x &^ (align - 1) }

// alignUp rounds x up to a multiple of align (a power of two).
func alignUp(x, align int64) int64 { return (x + align - 1) &^ (align - 1) }

// isPowerOfTwo reports whether x is a positive power of two.
func isPowerOfTwo(x int64) bool { return x > 0 && x&(x-1) == 0 }

// alignedInner returns the largest range [a, b) inside [off, off+n) whose ends are
// multiples of align, with b == a when there is none.
func alignedInner(off, n, align int64) (a, b int64) {
	a, b = alignUp(off, align), alignDown(off+n, align)
	if b < a {
		b = a
	}
	return a, b
}
