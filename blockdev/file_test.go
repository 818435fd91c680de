package blockdev_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/testutil"
)

func TestOpenFileRefuses(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		path string
		opts blockdev.FileOptions
		want string
	}{
		{filepath.Join(dir, "missing"), blockdev.FileOptions{}, "no such file"},
		{dir, blockdev.FileOptions{}, "is a directory"},
		{dir, blockdev.FileOptions{ReadOnly: true}, "neither a regular file nor a block device"},
		{"/dev/null", blockdev.FileOptions{}, "neither a regular file nor a block device"},
	} {
		f, err := blockdev.OpenFile(c.path, c.opts)
		if err == nil {
			f.Close()
			t.Errorf("OpenFile(%s, %+v) succeeded", c.path, c.opts)
			continue
		}
		if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.path) {
			t.Errorf("OpenFile(%s, %+v): %q, want it to name the path and say %q", c.path, c.opts, err, c.want)
		}
	}

	// With Direct, a file whose size is not a multiple of the alignment.
	path := newSparseFile(t, blockdev.DirectDir(t), 1<<20+100)
	_, err := blockdev.OpenFile(path, blockdev.FileOptions{Direct: true})
	if err == nil || !strings.Contains(err.Error(), "not a multiple of the direct I/O alignment") {
		t.Errorf("OpenFile(unaligned size, Direct): %v", err)
	}
}

func TestFileNeverGrows(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			dir := ""
			if direct {
				dir = blockdev.DirectDir(t)
			}
			path := newSparseFile(t, dir, 64<<10)
			f, err := blockdev.OpenFile(path, blockdev.FileOptions{Direct: direct})
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			for _, off := range []int64{64<<10 - 1, 64<<10 - 4096, 64 << 10, 64<<10 + 4096} {
				if _, err := f.WriteAt(make([]byte, 8192), off); !errors.Is(err, blockdev.ErrOutOfRange) {
					t.Errorf("WriteAt(8192, %d): %v, want ErrOutOfRange", off, err)
				}
				if _, err := f.WriteAtFUA(make([]byte, 8192), off); !errors.Is(err, blockdev.ErrOutOfRange) {
					t.Errorf("WriteAtFUA(8192, %d): %v, want ErrOutOfRange", off, err)
				}
				if err := f.WriteZeroes(off, 8192, 0); !errors.Is(err, blockdev.ErrOutOfRange) {
					t.Errorf("WriteZeroes(%d, 8192): %v, want ErrOutOfRange", off, err)
				}
			}
			if _, err := f.WriteAt([]byte{1}, 64<<10-1); err != nil {
				t.Fatal(err)
			}
			if st, err := os.Stat(path); err != nil || st.Size() != 64<<10 {
				t.Fatalf("the file is now %d bytes (%v), want %d", st.Size(), err, 64<<10)
			}
		})
	}
}

// TestFileTrimDeallocates checks that Trim and WriteZeroes with ZeroMayUnmap really punch
// holes, and WriteZeroes without it keeps the blocks.
func TestFileTrimDeallocates(t *testing.T) {
	path := newSparseFile(t, "", 4<<20)
	f, err := blockdev.OpenFile(path, blockdev.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xee}, 4<<20), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	full := testutil.Allocated(t, path)
	if err := f.WriteZeroes(0, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	if a := testutil.Allocated(t, path); a < full {
		t.Errorf("WriteZeroes without ZeroMayUnmap freed %d bytes", full-a)
	}
	if err := f.Trim(1<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteZeroes(2<<20, 1<<20, blockdev.ZeroMayUnmap); err != nil {
		t.Fatal(err)
	}
	if a := testutil.Allocated(t, path); a > full-(2<<20) {
		t.Errorf("Trim and WriteZeroes(ZeroMayUnmap) of 2 MiB left %d of %d bytes allocated", a, full)
	}
	got := make([]byte, 3<<20)
	if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, make([]byte, 3<<20)) {
		t.Fatalf("zeroed and trimmed ranges do not read as zeroes (%v)", err)
	}
}

// sysfsInt reads an integer from the sysfs queue directory of a block device.
func sysfsInt(t *testing.T, dev, name string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "queue", name))
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestFileLoopDevice checks what is particular to block devices on a real loop device:
// the size from BLKGETSIZE64, the block size from BLKPBSZGET, BLKDISCARD reaching the
// backing file (which loses its blocks), BLKZEROOUT with ZeroFast, and the unaligned
// edges of a Trim left alone.
func TestFileLoopDevice(t *testing.T) {
	const size = 8 << 20
	dev, backing := newLoopDevice(t, size)
	f, err := blockdev.OpenFile(dev, blockdev.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Size() != size {
		t.Fatalf("Size = %d, want %d", f.Size(), size)
	}
	if c := f.Caps(); !c.Trim || !c.FastZero || !c.Zeroes || !c.FUA || c.ReadOnly || c.BlockSize != f.PreferredBlockSize() {
		t.Errorf("Caps of a loop device over a file = %+v, want everything", c)
	}
	if want := sysfsInt(t, dev, "physical_block_size"); int64(f.PreferredBlockSize()) != max(want, sysfsInt(t, dev, "logical_block_size")) {
		t.Errorf("PreferredBlockSize = %d, want the physical block size %d", f.PreferredBlockSize(), want)
	}

	data := bytes.Repeat([]byte{0x5a}, size)
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	full := testutil.Allocated(t, backing)

	// Trim 4 MiB less one byte at each end: the unaligned edges stay as they were.
	if err := f.Trim(1<<20+1, 4<<20-2); err != nil {
		t.Fatal(err)
	}
	if a := testutil.Allocated(t, backing); a > full-(3<<20) {
		t.Errorf("BLKDISCARD of 4 MiB left %d of %d bytes allocated in the backing file", a, full)
	}
	edges := make([]byte, 2)
	if _, err := f.ReadAt(edges[:1], 1<<20+1); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(edges[1:], 5<<20-2); err != nil {
		t.Fatal(err)
	}
	if edges[0] != 0x5a || edges[1] != 0x5a {
		t.Errorf("Trim changed its unaligned edges: %#x", edges)
	}

	if sysfsInt(t, dev, "write_zeroes_max_bytes") == 0 {
		t.Fatalf("%s does not offload WRITE_ZEROES; this kernel's loop driver should", dev)
	}
	if err := f.WriteZeroes(6<<20+3, 1<<20, blockdev.ZeroFast); err != nil {
		t.Fatalf("WriteZeroes(ZeroFast) on a loop device: %v", err)
	}
	got := make([]byte, 1<<20+2)
	if _, err := f.ReadAt(got, 6<<20+2); err != nil {
		t.Fatal(err)
	}
	if got[0] != 0x5a || got[len(got)-1] != 0x5a || !bytes.Equal(got[1:len(got)-1], make([]byte, 1<<20)) {
		t.Error("WriteZeroes(ZeroFast) on a loop device zeroed the wrong bytes")
	}
}
