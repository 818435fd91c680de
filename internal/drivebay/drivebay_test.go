package drivebay_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/drivebay"
	"github.com/atrest/atrest/internal/testutil"
)

// ioBound is how long a failing I/O on a pulled drive may take. It fails at once;
// the bound only keeps a hang from stalling the suite on a loaded machine.
const ioBound = 20 * time.Second

// newImage makes a backing file of size bytes with random contents.
func newImage(t *testing.T, size int) (path string, data []byte) {
	t.Helper()
	data = make([]byte, size)
	rand.Read(data)
	path = filepath.Join(t.TempDir(), "drive.img")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, data
}

// openDirect opens a loop device for direct I/O, closed when the test ends unless the
// test closes it first.
func openDirect(t *testing.T, dev string) int {
	t.Helper()
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// inserted mounts a bay with one drive of size bytes of random data in slot "sdc",
// attaches a loop device over it and opens that for direct I/O.
func inserted(t *testing.T, size int) (bay *drivebay.Bay, data []byte, dev string, fd int) {
	t.Helper()
	img, data := newImage(t, size)
	bay = drivebay.Mount(t, drivebay.Options{})
	if err := bay.Insert("sdc", img); err != nil {
		t.Fatal(err)
	}
	dev, err := bay.Attach("sdc")
	if err != nil {
		t.Fatal(err)
	}
	return bay, data, dev, openDirect(t, dev)
}

// within runs fn and returns its error, failing the test if it does not return
// within ioBound.
func within(t *testing.T, what string, fn func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err
	case <-time.After(ioBound):
		t.Fatalf("%s did not return within %v", what, ioBound)
		return nil
	}
}

func pread(fd int, n int, off int64) ([]byte, error) {
	buf := blockdev.AlignedBuffer(n)
	got, err := unix.Pread(fd, buf, off)
	if err == nil && got != n {
		err = fmt.Errorf("short read: %d of %d bytes", got, n)
	}
	return buf, err
}

func pwrite(fd int, p []byte, off int64) error {
	buf := blockdev.AlignedBuffer(len(p))
	copy(buf, p)
	got, err := unix.Pwrite(fd, buf, off)
	if err == nil && got != len(p) {
		err = fmt.Errorf("short write: %d of %d bytes", got, len(p))
	}
	return err
}

// rangeIoctl issues BLKDISCARD or BLKZEROOUT over [off, off+n).
func rangeIoctl(fd int, req uint, off, n int64) error {
	r := [2]uint64{uint64(off), uint64(n)}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&r))); e != 0 {
		return e
	}
	return nil
}

func TestPassThrough(t *testing.T) {
	const size = 8 << 20
	img, data := newImage(t, size)
	bay := drivebay.Mount(t, drivebay.Options{})
	if err := bay.Insert("sdc", img); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(bay.Path("sdc"))
	if err != nil || fi.Size() != size {
		t.Fatalf("slot file: %v, %v (want %d bytes)", fi, err, size)
	}
	dev, err := bay.Attach("sdc")
	if err != nil {
		t.Fatal(err)
	}
	fd := openDirect(t, dev)

	// What the backing file holds reads through the loop device.
	got, err := pread(fd, 1<<20, 3<<20)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data[3<<20:4<<20]) {
		t.Fatal("a read through the loop device differs from the backing file")
	}
	// What is written through the loop device lands in the backing file, durably
	// once fsync returns (fdatasync on the backing file).
	w := make([]byte, 64<<10)
	rand.Read(w)
	if err := pwrite(fd, w, 5<<20+4096); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fsync(fd); err != nil {
		t.Fatal(err)
	}
	back, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back[5<<20+4096:5<<20+4096+len(w)], w) {
		t.Fatal("a write through the loop device did not land in the backing file")
	}
	// A write to the backing file reads back through the loop device (no cache).
	rand.Read(w)
	f, err := os.OpenFile(img, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt(w, 1<<20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if got, err := pread(fd, len(w), 1<<20); err != nil || !bytes.Equal(got, w) {
		t.Fatalf("a write to the backing file did not read back through the loop device (%v)", err)
	}

	// The loop device's discards and write-zeroes reach the backing file as
	// fallocate PUNCH_HOLE and ZERO_RANGE: the ranges read back as zeroes, and the
	// discarded one is deallocated.
	before := testutil.Allocated(t, img)
	if err := rangeIoctl(fd, unix.BLKDISCARD, 2<<20, 1<<20); err != nil {
		t.Fatalf("BLKDISCARD: %v", err)
	}
	if after := testutil.Allocated(t, img); after > before-1<<20 {
		t.Errorf("a discard of 1 MiB freed %d bytes of the backing file", before-after)
	}
	if err := rangeIoctl(fd, unix.BLKZEROOUT, 6<<20, 1<<20); err != nil {
		t.Fatalf("BLKZEROOUT: %v", err)
	}
	for _, off := range []int64{2 << 20, 6 << 20} {
		got, err := pread(fd, 1<<20, off)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, make([]byte, 1<<20)) {
			t.Errorf("the range at %d does not read back as zeroes", off)
		}
	}
}

func TestPull(t *testing.T) {
	for _, mode := range []drivebay.PullMode{drivebay.PullEIO, drivebay.PullENODEV} {
		t.Run(mode.String(), func(t *testing.T) {
			bay, data, dev, fd := inserted(t, 4<<20)
			// The slot's file itself, opened before the pull, sees the pull's errno.
			slot, err := unix.Open(bay.Path("sdc"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(slot)

			if err := bay.Pull("sdc", mode); err != nil {
				t.Fatal(err)
			}
			// Reads and writes fail at once, and do not hang, with the mode's errno:
			// the loop driver passes ENODEV on (as BLK_STS_OFFLINE), anything else
			// as EIO.
			want := unix.EIO
			if mode == drivebay.PullENODEV {
				want = unix.ENODEV
			}
			err = within(t, "a read of the pulled drive", func() error { _, err := pread(fd, 4096, 0); return err })
			if !errors.Is(err, want) {
				t.Errorf("read of the pulled loop device: %v, want %v", err, want)
			}
			err = within(t, "a write to the pulled drive", func() error { return pwrite(fd, make([]byte, 4096), 8192) })
			if !errors.Is(err, want) {
				t.Errorf("write to the pulled loop device: %v, want %v", err, want)
			}
			if _, err := unix.Pread(slot, make([]byte, 4096), 0); !errors.Is(err, want) {
				t.Errorf("read of the pulled slot's file: %v, want %v", err, want)
			}
			if _, err := os.Stat(bay.Path("sdc")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the pulled slot is still in the directory: %v", err)
			}
			if _, err := bay.Attach("sdc"); err == nil {
				t.Error("Attach of a pulled slot succeeded")
			}

			// Back under another name, while the old loop device is still held open
			// (as a daemon holds a drive it has not yet given up): a new loop device
			// reads the same data.
			if err := bay.Reinsert("sdc", "sdf"); err != nil {
				t.Fatal(err)
			}
			dev2, err := bay.Attach("sdf")
			if err != nil {
				t.Fatal(err)
			}
			if dev2 == dev {
				t.Fatalf("the reinserted drive came back at the same loop device %s", dev)
			}
			fd2 := openDirect(t, dev2)
			got, err := pread(fd2, 1<<20, 1<<20)
			if err != nil || !bytes.Equal(got, data[1<<20:2<<20]) {
				t.Fatalf("the reinserted drive does not read the same data (%v)", err)
			}
			// The old loop device still fails, and goes once its last holder closes it.
			if _, err := pread(fd, 4096, 0); !errors.Is(err, want) {
				t.Errorf("read of the old loop device after the reinsertion: %v, want %v", err, want)
			}
			unix.Close(fd)
			waitDetached(t, dev, bay.Dir())
		})
	}
}

func TestPullHang(t *testing.T) {
	bay, _, _, fd := inserted(t, 4<<20)
	if err := bay.Pull("sdc", drivebay.PullHang); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := pread(fd, 4096, 0); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("a read of a hanging drive returned: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if err := bay.Reinsert("sdc", "sdd"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, unix.ENODEV) {
			t.Errorf("the held read ended with %v, want ENODEV", err)
		}
	case <-time.After(ioBound):
		t.Fatal("the held read did not end after the reinsertion")
	}
}

func TestFailRange(t *testing.T) {
	bay, data, _, fd := inserted(t, 4<<20)
	heal, err := bay.FailRange("sdc", 1<<20, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pread(fd, 8192, 1<<20-4096); !errors.Is(err, unix.EIO) {
		t.Errorf("read across the bad range: %v, want EIO", err)
	}
	if err := pwrite(fd, make([]byte, 4096), 1<<20); !errors.Is(err, unix.EIO) {
		t.Errorf("write to the bad range: %v, want EIO", err)
	}
	if got, err := pread(fd, 4096, 2<<20); err != nil || !bytes.Equal(got, data[2<<20:2<<20+4096]) {
		t.Errorf("read outside the bad range: %v", err)
	}
	heal()
	if got, err := pread(fd, 4096, 1<<20); err != nil || !bytes.Equal(got, data[1<<20:1<<20+4096]) {
		t.Errorf("read of the healed range: %v", err)
	}
}

func TestErrors(t *testing.T) {
	img, _ := newImage(t, 1<<20)
	bay := drivebay.Mount(t, drivebay.Options{})
	if err := bay.Insert("a", img); err != nil {
		t.Fatal(err)
	}
	for what, err := range map[string]error{
		"Insert into a taken slot":    bay.Insert("a", img),
		"Insert of a directory":       bay.Insert("b", t.TempDir()),
		"Insert under a bad name":     bay.Insert("x/y", img),
		"Reinsert of a present drive": bay.Reinsert("a", "c"),
		"Pull of an empty slot":       bay.Pull("nothing", drivebay.PullEIO),
		"Pull with no mode":           bay.Pull("a", 0),
	} {
		if err == nil {
			t.Errorf("%s succeeded", what)
		}
	}
}

// waitDetached waits until dev is no longer a loop device over a file in dir.
func waitDetached(t *testing.T, dev, dir string) {
	t.Helper()
	deadline := time.Now().Add(ioBound)
	for {
		b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop/backing_file"))
		if err != nil || !strings.HasPrefix(string(b), dir+"/") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is still attached over %s", dev, strings.TrimSpace(string(b)))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// leftovers returns the mounts at or under dir and the loop devices over files in it.
func leftovers(t *testing.T, dir string) (mounts, loops []string) {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 && strings.HasPrefix(fields[4], dir) {
			mounts = append(mounts, fields[4])
		}
	}
	backings, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range backings {
		if b, err := os.ReadFile(p); err == nil && strings.HasPrefix(string(b), dir) {
			loops = append(loops, strings.TrimSpace(string(b)))
		}
	}
	return mounts, loops
}

// checkClean fails the test if anything of the bay in dir is still there after a
// few seconds (a loop device lets go of its file in a work queue).
func checkClean(t *testing.T, dir string) {
	t.Helper()
	deadline := time.Now().Add(ioBound)
	for {
		mounts, loops := leftovers(t, dir)
		if len(mounts) == 0 && len(loops) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind: mounts %q, loop devices over %q", mounts, loops)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestCleanup checks that a bay leaves nothing behind, after a test that passes (a
// subtest here) and after one that fails with a drive hanging, a read held in it, a
// loop device still open and a slot's file open (a child process running
// TestCleanupHelper).
func TestCleanup(t *testing.T) {
	var dir string
	t.Run("passes", func(t *testing.T) {
		img, _ := newImage(t, 1<<20)
		bay := drivebay.Mount(t, drivebay.Options{BlockSize: 512})
		dir = bay.Dir()
		for _, name := range []string{"a", "b"} {
			if err := bay.Insert(name, img); err != nil {
				t.Fatal(err)
			}
			if _, err := bay.Attach(name); err != nil {
				t.Fatal(err)
			}
		}
	})
	checkClean(t, dir)

	t.Run("fails", func(t *testing.T) {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCleanupHelper$", "-test.v")
		cmd.Env = append(os.Environ(), "DRIVEBAY_HELPER=1")
		out, err := cmd.CombinedOutput()
		if err == nil || !bytes.Contains(out, []byte("--- FAIL: TestCleanupHelper")) {
			t.Fatalf("the helper test did not fail as it should (%v):\n%s", err, out)
		}
		var dir string
		for line := range strings.Lines(string(out)) {
			if d, ok := strings.CutPrefix(strings.TrimSpace(line), "BAYDIR="); ok {
				dir = d
			}
		}
		if dir == "" {
			t.Fatalf("the helper did not say where its bay was:\n%s", out)
		}
		checkClean(t, dir)
	})
}

// TestCleanupHelper is the failing test of TestCleanup, run in a child process.
func TestCleanupHelper(t *testing.T) {
	if os.Getenv("DRIVEBAY_HELPER") != "1" {
		t.Skip("run by TestCleanup")
	}
	img, _ := newImage(t, 1<<20)
	bay := drivebay.Mount(t, drivebay.Options{})
	fmt.Printf("BAYDIR=%s\n", bay.Dir())
	for _, name := range []string{"a", "b"} {
		if err := bay.Insert(name, img); err != nil {
			t.Fatal(err)
		}
	}
	devA, err := bay.Attach("a")
	if err != nil {
		t.Fatal(err)
	}
	devB, err := bay.Attach("b")
	if err != nil {
		t.Fatal(err)
	}
	// Drive a hangs with a read held in it; b's loop device and its slot's file are
	// open and never closed by the test.
	fdA, err := unix.Open(devA, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Open(devB, unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Open(bay.Path("b"), unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
		t.Fatal(err)
	}
	if err := bay.Pull("a", drivebay.PullHang); err != nil {
		t.Fatal(err)
	}
	go pread(fdA, 4096, 0)
	time.Sleep(100 * time.Millisecond)
	t.Fatal("failing on purpose, with a hanging drive and open devices")
}
