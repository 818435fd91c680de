package fusefs

import (
	"math"
	"syscall"
	"testing"
)

func TestReadSpan(t *testing.T) {
	for _, c := range []struct {
		off   int64
		n     int
		size  int64
		want  int
		errno syscall.Errno
	}{
		{0, 4096, 8192, 4096, 0},
		{4096, 4096, 8192, 4096, 0},
		{6144, 4096, 8192, 2048, 0}, // crosses the end
		{8192, 4096, 8192, 0, 0},    // at the end
		{9000, 4096, 8192, 0, 0},    // after the end
		{0, 0, 8192, 0, 0},
		{0, 4096, 0, 0, 0}, // empty file
		{-1, 4096, 8192, 0, syscall.EINVAL},
		{math.MaxInt64, 1 << 20, 8192, 0, 0},
	} {
		got, errno := readSpan(c.off, c.n, c.size)
		if got != c.want || errno != c.errno {
			t.Errorf("readSpan(%d, %d, %d) = %d, %v; want %d, %v", c.off, c.n, c.size, got, errno, c.want, c.errno)
		}
	}
}

func TestWriteSpan(t *testing.T) {
	for _, c := range []struct {
		off   int64
		n     int
		size  int64
		want  int
		errno syscall.Errno
	}{
		{0, 4096, 8192, 4096, 0},
		{6144, 4096, 8192, 2048, 0}, // crosses the end: short write
		{8192, 4096, 8192, 0, syscall.ENOSPC},
		{1 << 40, 1, 8192, 0, syscall.ENOSPC},
		{8192, 0, 8192, 0, 0}, // empty write at the end is fine
		{0, 1, 0, 0, syscall.ENOSPC},
		{-4096, 4096, 8192, 0, syscall.EINVAL},
	} {
		got, errno := writeSpan(c.off, c.n, c.size)
		if got != c.want || errno != c.errno {
			t.Errorf("writeSpan(%d, %d, %d) = %d, %v; want %d, %v", c.off, c.n, c.size, got, errno, c.want, c.errno)
		}
	}
}

func TestAllocSpan(t *testing.T) {
	for _, c := range []struct {
		off, length uint64
		size        int64
		keep        bool
		start, n    int64
		errno       syscall.Errno
	}{
		{0, 4096, 8192, false, 0, 4096, 0},
		{0, 8192, 8192, false, 0, 8192, 0},
		{4096, 8192, 8192, false, 0, 0, syscall.EFBIG}, // would grow the file
		{4096, 8192, 8192, true, 4096, 4096, 0},        // clipped
		{8192, 4096, 8192, true, 0, 0, 0},              // entirely after the end
		{8192, 4096, 8192, false, 0, 0, syscall.EFBIG}, // likewise, but would grow
		{0, 0, 8192, true, 0, 0, syscall.EINVAL},       // empty range
		{math.MaxUint64, 1, 8192, true, 0, 0, syscall.EINVAL},
		{1, math.MaxInt64, 8192, true, 0, 0, syscall.EINVAL}, // overflows
		{0, math.MaxInt64, 8192, true, 0, 8192, 0},
	} {
		start, n, errno := allocSpan(c.off, c.length, c.size, c.keep)
		if start != c.start || n != c.n || errno != c.errno {
			t.Errorf("allocSpan(%d, %d, %d, %v) = %d, %d, %v; want %d, %d, %v",
				c.off, c.length, c.size, c.keep, start, n, errno, c.start, c.n, c.errno)
		}
	}
}
