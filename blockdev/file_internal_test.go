package blockdev

// These tests replace a File's system calls (File.sys) to make the kernel do what it does
// not do on demand on a regular file or a block device: short reads and writes in the
// middle of a file, EINTR (reads and writes of disk files are not interruptible),
// pwritev2 without RWF_DSYNC, and EOPNOTSUPP from fallocate or BLKZEROOUT on file systems
// that support them. What the kernel does for real is tested for real elsewhere: short
// transfers and EINTR from a FUSE file (file_fuse_test.go), short reads at a shrunken
// end (TestFileShrunkBehindItsBack), EOPNOTSUPP from tmpfs (TestFileZeroesOnTmpfs),
// punch hole and discard (file_test.go).

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/internal/testutil"
)

// newTestFile returns a File over a fresh file of size bytes filled with random bytes in
// dir (a temporary directory when empty), and those bytes.
func newTestFile(t *testing.T, dir string, size int64, opts FileOptions) (*File, []byte) {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(uint64(size), 7))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	path := filepath.Join(dir, "drive.img")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(path) })
	f, err := OpenFile(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, data
}

// directDir returns a fresh directory under /var/tmp, on the disk, where O_DIRECT is
// real (like directIODir in suite_test.go, which this package's tests cannot reach).
func directDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/var/tmp", "atrest-blockdev-")
	if err != nil {
		testutil.Unavailable(t, "no directory for O_DIRECT under /var/tmp: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// The kernel reports the alignment of regular files only.
	probe := filepath.Join(dir, "probe")
	if err := os.WriteFile(probe, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(probe)
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, probe, 0, unix.STATX_DIOALIGN, &stx); err != nil {
		t.Fatal(err)
	}
	if stx.Mask&unix.STATX_DIOALIGN == 0 || stx.Dio_offset_align == 0 {
		testutil.Unavailable(t, "/var/tmp is on a file system without direct I/O")
	}
	return dir
}

// stingySys returns system calls that move at most max bytes per call (a multiple of
// align), fail every third call with EINTR, and report through t any call that O_DIRECT
// would refuse (offset, length or address not aligned to align).
func stingySys(t *testing.T, max, align int, calls *atomic.Int64) sysCalls {
	var n atomic.Int64
	check := func(what string, p []byte, off int64) {
		if align > 1 && (off%int64(align) != 0 || len(p)%align != 0 || !isAligned(p, align)) {
			t.Errorf("%s of %d bytes at %d from %p: not aligned to %d", what, len(p), off, unsafe.SliceData(p), align)
		}
	}
	interrupt := func() bool { return n.Add(1)%3 == 0 }
	return sysCalls{
		pread: func(fd int, p []byte, off int64) (int, error) {
			calls.Add(1)
			check("pread", p, off)
			if interrupt() {
				return -1, unix.EINTR
			}
			return unix.Pread(fd, p[:min(len(p), max)], off)
		},
		pwrite: func(fd int, p []byte, off int64) (int, error) {
			calls.Add(1)
			check("pwrite", p, off)
			if interrupt() {
				return -1, unix.EINTR
			}
			return unix.Pwrite(fd, p[:min(len(p), max)], off)
		},
		pwritev2: func(fd int, iovs [][]byte, off int64, flags int) (int, error) {
			calls.Add(1)
			if len(iovs) != 1 || flags != unix.RWF_DSYNC {
				t.Errorf("pwritev2 with %d buffers and flags %#x", len(iovs), flags)
			}
			check("pwritev2", iovs[0], off)
			if interrupt() {
				return -1, unix.EINTR
			}
			return unix.Pwritev2(fd, [][]byte{iovs[0][:min(len(iovs[0]), max)]}, off, flags)
		},
		fallocate: func(fd int, mode uint32, off, n int64) error {
			if interrupt() {
				return unix.EINTR
			}
			return unix.Fallocate(fd, mode, off, n)
		},
		fdatasync: func(fd int) error {
			if interrupt() {
				return unix.EINTR
			}
			return unix.Fdatasync(fd)
		},
		ioctlRange: ioctlRange,
	}
}

// TestFileShortTransfersAndEINTR checks, against a model, that File goes on after short
// reads and writes and retries EINTR, and with Direct that every call it makes is aligned.
func TestFileShortTransfersAndEINTR(t *testing.T) {
	for _, direct := range []bool{false, true} {
		name := "buffered"
		if direct {
			name = "direct"
		}
		t.Run(name, func(t *testing.T) {
			dir, max, align := "", 1000, 1
			if direct {
				dir, max = directDir(t), 3*4096
			}
			f, model := newTestFile(t, dir, 1<<20, FileOptions{Direct: direct})
			if direct {
				align = int(f.dioAlign)
				max = max / align * align
			}
			var calls atomic.Int64
			f.sys = stingySys(t, max, align, &calls)
			r := rand.New(rand.NewPCG(1, 2))
			for i := range 300 {
				off := r.Int64N(int64(len(model)))
				n := min(1+r.Int64N(40000), int64(len(model))-off)
				if r.IntN(2) == 0 {
					off, n = off&^4095, (n+4095)&^4095
					n = min(n, int64(len(model))-off)
				}
				switch r.IntN(4) {
				case 0, 1:
					p := make([]byte, n)
					for j := range p {
						p[j] = byte(r.Uint32())
					}
					var k int
					var err error
					if r.IntN(2) == 0 {
						k, err = f.WriteAt(p, off)
					} else {
						k, err = f.WriteAtFUA(p, off)
					}
					if err != nil || k != len(p) {
						t.Fatalf("op %d: write %d bytes at %d: %d, %v", i, n, off, k, err)
					}
					copy(model[off:], p)
				case 2:
					if err := f.WriteZeroes(off, n, 0); err != nil {
						t.Fatalf("op %d: WriteZeroes(%d, %d): %v", i, off, n, err)
					}
					clear(model[off : off+n])
				default:
					p := make([]byte, n)
					if k, err := f.ReadAt(p, off); k != len(p) || (err != nil && err != io.EOF) {
						t.Fatalf("op %d: read %d bytes at %d: %d, %v", i, n, off, k, err)
					}
					if !bytes.Equal(p, model[off:off+n]) {
						t.Fatalf("op %d: read %d bytes at %d: wrong data", i, n, off)
					}
				}
			}
			if err := f.Flush(); err != nil {
				t.Fatal(err)
			}
			all := make([]byte, len(model))
			if _, err := f.ReadAt(all, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(all, model) {
				t.Fatal("the drive differs from the model")
			}
			t.Logf("%d system calls of at most %d bytes", calls.Load(), max)
		})
	}
}

// TestFileDirectZeroCopy checks that with Direct an aligned request from an aligned
// buffer reaches the kernel with the caller's buffer, and others through a bounce buffer.
func TestFileDirectZeroCopy(t *testing.T) {
	f, _ := newTestFile(t, directDir(t), 1<<20, FileOptions{Direct: true})
	var last atomic.Pointer[byte]
	f.sys.pread = func(fd int, p []byte, off int64) (int, error) {
		last.Store(unsafe.SliceData(p))
		return unix.Pread(fd, p, off)
	}
	buf := AlignedBuffer(64 << 10)
	if _, err := f.ReadAt(buf, 8192); err != nil {
		t.Fatal(err)
	}
	if last.Load() != unsafe.SliceData(buf) {
		t.Error("an aligned read went through a bounce buffer")
	}
	if _, err := f.ReadAt(buf[1:4097], 8192); err != nil {
		t.Fatal(err)
	}
	if p := last.Load(); p == unsafe.SliceData(buf[1:]) || uintptr(unsafe.Pointer(p))%BufferAlign != 0 {
		t.Errorf("an unaligned buffer reached pread at %p", p)
	}
}

// TestFileZeroProgress checks that a pread or pwrite that moves nothing ends the call with
// an error instead of looping.
func TestFileZeroProgress(t *testing.T) {
	f, _ := newTestFile(t, "", 64<<10, FileOptions{})
	f.sys.pread = func(int, []byte, int64) (int, error) { return 0, nil }
	f.sys.pwrite = func(int, []byte, int64) (int, error) { return 0, nil }
	if _, err := f.ReadAt(make([]byte, 100), 0); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("read that makes no progress: %v, want io.ErrUnexpectedEOF", err)
	}
	if _, err := f.WriteAt(make([]byte, 100), 0); !errors.Is(err, io.ErrShortWrite) {
		t.Errorf("write that makes no progress: %v, want io.ErrShortWrite", err)
	}
}

// TestFileShrunkBehindItsBack truncates the file under an open File: pread really comes
// back short, then with nothing, which must end in an error.
func TestFileShrunkBehindItsBack(t *testing.T) {
	f, data := newTestFile(t, "", 1<<20, FileOptions{})
	if err := os.Truncate(f.path, 512<<10); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 8192)
	n, err := f.ReadAt(p, 512<<10-4096)
	if n != 4096 || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("read across the new end: %d, %v; want 4096, io.ErrUnexpectedEOF", n, err)
	}
	if !bytes.Equal(p[:n], data[512<<10-4096:512<<10]) {
		t.Fatal("read across the new end: wrong data before it")
	}
}

// TestFileFUAFallback checks that WriteAtFUA writes and calls fdatasync where pwritev2
// does not know RWF_DSYNC, and uses RWF_DSYNC where it does.
func TestFileFUAFallback(t *testing.T) {
	f, _ := newTestFile(t, "", 64<<10, FileOptions{})
	var v2, syncs atomic.Int64
	f.sys.pwritev2 = func(fd int, iovs [][]byte, off int64, flags int) (int, error) {
		v2.Add(1)
		return unix.Pwritev2(fd, iovs, off, flags)
	}
	f.sys.fdatasync = func(fd int) error { syncs.Add(1); return unix.Fdatasync(fd) }
	p := bytes.Repeat([]byte{7}, 5000)
	if _, err := f.WriteAtFUA(p, 100); err != nil {
		t.Fatal(err)
	}
	if v2.Load() != 1 || syncs.Load() != 0 {
		t.Fatalf("FUA write: %d pwritev2, %d fdatasync; want 1, 0", v2.Load(), syncs.Load())
	}

	f.sys.pwritev2 = func(int, [][]byte, int64, int) (int, error) { v2.Add(1); return -1, unix.EOPNOTSUPP }
	for range 2 {
		if _, err := f.WriteAtFUA(p, 100); err != nil {
			t.Fatal(err)
		}
	}
	if v2.Load() != 2 || syncs.Load() != 2 {
		t.Fatalf("FUA writes without RWF_DSYNC: %d pwritev2 calls, %d fdatasync; want 2 (one tried), 2", v2.Load(), syncs.Load())
	}
	got := make([]byte, len(p))
	if _, err := f.ReadAt(got, 100); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v", err)
	}
}

// TestFileZeroesFallback checks WriteZeroes where fallocate answers EOPNOTSUPP: zero
// buffers, or ErrNotFast and no change under ZeroFast.
func TestFileZeroesFallback(t *testing.T) {
	f, data := newTestFile(t, "", 3<<20, FileOptions{})
	if c := f.Caps(); !c.Trim || !c.FastZero {
		t.Fatalf("Caps of a file on a file system that punches holes: %+v", c)
	}
	f.sys.fallocate = func(int, uint32, int64, int64) error { return unix.EOPNOTSUPP }
	for _, flags := range []ZeroFlags{ZeroFast, ZeroFast | ZeroMayUnmap} {
		if err := f.WriteZeroes(1000, 2<<20, flags); !errors.Is(err, ErrNotFast) {
			t.Fatalf("WriteZeroes(%#x) without fallocate: %v, want ErrNotFast", flags, err)
		}
	}
	if err := f.Trim(0, 4096); !errors.Is(err, ErrNotSupported) {
		t.Fatalf("Trim without fallocate: %v, want ErrNotSupported", err)
	}
	if c := f.Caps(); c.Trim || c.FastZero || !c.Zeroes {
		t.Fatalf("Caps once fallocate answered EOPNOTSUPP: %+v, want no Trim, no FastZero", c)
	}
	checkContents(t, f, data)
	if err := f.WriteZeroes(1000, 2<<20, ZeroMayUnmap); err != nil {
		t.Fatalf("WriteZeroes without fallocate: %v", err)
	}
	clear(data[1000 : 1000+2<<20])
	checkContents(t, f, data)
}

func checkContents(t *testing.T, dev Device, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	if n, err := dev.ReadAt(got, 0); n != len(got) || (err != nil && err != io.EOF) {
		t.Fatalf("read the whole device: %d, %v", n, err)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("byte at %d is %#x, want %#x", i, got[i], want[i])
		}
	}
}

// TestFileZeroesOnTmpfs runs WriteZeroes where the kernel really lacks ZERO_RANGE (tmpfs
// has PUNCH_HOLE only).
func TestFileZeroesOnTmpfs(t *testing.T) {
	var st unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		testutil.Unavailable(t, "/dev/shm is not a tmpfs")
	}
	dir, err := os.MkdirTemp("/dev/shm", "atrest-blockdev-")
	if err != nil {
		testutil.Unavailable(t, "no directory in /dev/shm: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f, data := newTestFile(t, dir, 1<<20, FileOptions{})
	if err := unix.Fallocate(f.fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Skipf("tmpfs does ZERO_RANGE now (%v): the fallback is tested by TestFileZeroesFallback", err)
	}
	if err := f.WriteZeroes(5000, 10000, ZeroFast); !errors.Is(err, ErrNotFast) {
		t.Fatalf("WriteZeroes(fast) on tmpfs: %v, want ErrNotFast", err)
	}
	checkContents(t, f, data)
	if err := f.WriteZeroes(5000, 10000, 0); err != nil {
		t.Fatalf("WriteZeroes on tmpfs: %v", err)
	}
	clear(data[5000:15000])
	if err := f.WriteZeroes(100000, 10000, ZeroFast|ZeroMayUnmap); err != nil {
		t.Fatalf("WriteZeroes(fast, may unmap) on tmpfs, which can punch holes: %v", err)
	}
	clear(data[100000:110000])
	checkContents(t, f, data)
	if c := f.Caps(); !c.Trim || !c.FastZero {
		t.Errorf("Caps on tmpfs, which punches holes but does not zero ranges: %+v, want Trim and FastZero", c)
	}
}

// TestFileErrorClasses: an errno from the kernel reaches the caller with its class and
// itself, on every path.
func TestFileErrorClasses(t *testing.T) {
	f, _ := newTestFile(t, "", 64<<10, FileOptions{})
	f.sys.pread = func(int, []byte, int64) (int, error) { return -1, unix.EIO }
	f.sys.pwrite = func(int, []byte, int64) (int, error) { return -1, unix.ENODEV }
	f.sys.pwritev2 = func(int, [][]byte, int64, int) (int, error) { return -1, unix.ENOSPC }
	f.sys.fdatasync = func(int) error { return unix.ENOTCONN }
	f.sys.fallocate = func(int, uint32, int64, int64) error { return unix.ENODATA }
	_, readErr := f.ReadAt(make([]byte, 512), 0)
	_, writeErr := f.WriteAt(make([]byte, 512), 0)
	_, fuaErr := f.WriteAtFUA(make([]byte, 512), 0)
	for _, c := range []struct {
		what         string
		err          error
		errno, class error // class nil: none
	}{
		{"read", readErr, unix.EIO, ErrMedium},
		{"write", writeErr, unix.ENODEV, ErrGone},
		{"FUA write", fuaErr, unix.ENOSPC, nil},
		{"flush", f.Flush(), unix.ENOTCONN, ErrGone},
		{"trim", f.Trim(0, 4096), unix.ENODATA, ErrMedium},
		{"write zeroes", f.WriteZeroes(0, 4096, 0), unix.ENODATA, ErrMedium},
	} {
		if !errors.Is(c.err, c.errno) {
			t.Errorf("%s: %v, want %v", c.what, c.err, c.errno)
		}
		for _, class := range []error{ErrGone, ErrMedium, ErrTimeout} {
			if errors.Is(c.err, class) != (class == c.class) {
				t.Errorf("%s: %v: matches %v is %v", c.what, c.err, class, class != c.class)
			}
		}
	}
}

// TestFileCloseWhileBusy closes a File under readers and writers: each call either
// succeeds or fails with ErrClosed; none touches a closed descriptor (EBADF) or another
// file that reused its number.
func TestFileCloseWhileBusy(t *testing.T) {
	for range 5 {
		f, _ := newTestFile(t, "", 1<<20, FileOptions{})
		var wg sync.WaitGroup
		start := make(chan struct{})
		for w := range 4 {
			wg.Go(func() {
				<-start
				p := make([]byte, 4096)
				for i := 0; ; i++ {
					var err error
					if (w+i)%2 == 0 {
						_, err = f.ReadAt(p, int64(i%256)*4096)
					} else {
						_, err = f.WriteAt(p, int64(i%256)*4096)
					}
					if errors.Is(err, ErrClosed) {
						return
					}
					if err != nil {
						t.Errorf("call %d beside Close: %v", i, err)
						return
					}
				}
			})
		}
		close(start)
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		// Reuse the descriptor number at once: a call that raced with Close would hit it.
		other, err := os.CreateTemp(t.TempDir(), "other")
		if err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		if st, _ := other.Stat(); st.Size() != 0 {
			t.Fatalf("a call after Close wrote %d bytes into another file", st.Size())
		}
		other.Close()
		if err := f.Close(); !errors.Is(err, ErrClosed) {
			t.Fatalf("second Close: %v, want ErrClosed", err)
		}
	}
}
