package slot_test

import (
	"crypto/rand"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/drivebay"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/slot"
)

// The slot over real block devices: loop devices over the files of a FUSE drive bay
// (internal/drivebay), which a test pulls as an operator pulls a SATA drive.

// bayImageSize is the size of a drive image in the bay: the 16 MiB LUKS2 header area
// and 8 MiB of data.
const bayImageSize = luks2.DataOffset + 8<<20

// bayDataOff is where the tests write, in the data segment.
const bayDataOff = luks2.DataOffset + 1<<20

// openDirect is how the node opens a drive it serves.
func openDirect(path string) (blockdev.Device, error) {
	return blockdev.OpenFile(path, blockdev.FileOptions{Direct: true, Exclusive: true})
}

// bayDrive formats a drive image with LUKS2, inserts it into a new bay as slot "sdc",
// attaches a loop device over it and makes a slot over that, opened as the node opens
// it. It returns the bay, the image and the slot.
func bayDrive(t *testing.T, cfg slot.Config) (*drivebay.Bay, string, *slot.Slot) {
	t.Helper()
	img := imageFile(t, bayImageSize, nil)
	f, err := blockdev.OpenFile(img, blockdev.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vk := make([]byte, luks2.KeySize)
	rand.Read(vk)
	if _, err := luks2.Format(f, luks2.FormatOptions{VolumeKey: vk, Passphrase: []byte("bay test")}); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	bay := drivebay.Mount(t, drivebay.Options{})
	if err := bay.Insert("sdc", img); err != nil {
		t.Fatal(err)
	}
	loop, err := bay.Attach("sdc")
	if err != nil {
		t.Fatal(err)
	}
	dev, err := openDirect(loop)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Path, cfg.Open = loop, openDirect
	s, err := slot.New(dev, cfg)
	if err != nil {
		dev.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() }) // before the bay's cleanup: the loop device must close
	return bay, img, s
}

// TestBayPull: a real block device pulled under the slot (its I/O fails with EIO or
// ENODEV, as a pulled drive's does) is found gone by the probe, and the write that
// failed waits; put back under another name at another /dev/loopN, it is served again
// with every write on it, the one that waited included.
func TestBayPull(t *testing.T) {
	for _, mode := range []drivebay.PullMode{drivebay.PullEIO, drivebay.PullENODEV} {
		t.Run(mode.String(), func(t *testing.T) {
			bay, img, s := bayDrive(t, slot.Config{MissingTimeout: time.Minute})
			loop := s.State().Path
			flushed, unflushed, waited := random(1<<20), random(64<<10), random(256<<10)
			if _, err := s.WriteAt(flushed, bayDataOff); err != nil {
				t.Fatal(err)
			}
			if err := s.Flush(); err != nil {
				t.Fatal(err)
			}
			if _, err := s.WriteAt(unflushed, bayDataOff+2<<20); err != nil {
				t.Fatal(err)
			}

			// Another holder of the old loop device keeps it attached after the slot
			// lets go of it, so that the drive comes back at another /dev/loopN.
			holder, err := os.Open(loop)
			if err != nil {
				t.Fatal(err)
			}
			defer holder.Close()
			if err := bay.Pull("sdc", mode); err != nil {
				t.Fatal(err)
			}
			done := returned(func() error { _, err := s.WriteAt(waited, bayDataOff+3<<20); return err })
			st := waitFor(t, s, "missing", isMissing)
			if st.Path != loop || st.Generation != 2 || !strings.Contains(st.Reason, "probe failed") {
				t.Errorf("state after the pull: %+v", st)
			}
			t.Logf("missing: %s", st.Reason)
			time.Sleep(300 * time.Millisecond)
			pending(t, "a write to the pulled drive", done)

			if err := bay.Reinsert("sdc", "sdf"); err != nil {
				t.Fatal(err)
			}
			loop2, err := bay.Attach("sdf")
			if err != nil {
				t.Fatal(err)
			}
			if loop2 == loop {
				t.Fatalf("the drive came back at the same loop device %s", loop)
			}
			if err := s.Reinsert(loop2); err != nil {
				t.Fatal(err)
			}
			if err := result(t, "the waiting write", done); err != nil {
				t.Fatalf("the write that waited for the drive: %v", err)
			}
			st = s.State()
			if st.Presence != slot.Present || st.Path != loop2 || st.ReturnedPath != loop2 || st.Generation != 3 {
				t.Errorf("state after the reinsertion: %+v", st)
			}
			mustEqual(t, "the flushed write", readAll(t, s, bayDataOff, 1<<20), flushed)
			mustEqual(t, "the unflushed write", readAll(t, s, bayDataOff+2<<20, 64<<10), unflushed)
			mustEqual(t, "the write that waited", readAll(t, s, bayDataOff+3<<20, 256<<10), waited)

			// The image itself, read beside the bay, after a flush.
			if err := s.Flush(); err != nil {
				t.Fatal(err)
			}
			image, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "the image's flushed write", image[bayDataOff:bayDataOff+1<<20], flushed)
			mustEqual(t, "the image's unflushed write", image[bayDataOff+2<<20:bayDataOff+2<<20+64<<10], unflushed)
			mustEqual(t, "the image's write that waited", image[bayDataOff+3<<20:bayDataOff+3<<20+256<<10], waited)
		})
	}
}

// TestBayHang: a drive that stops answering is found gone by Check (the probe does
// not answer within its timeout), and the write stuck in it, failed by the kernel once
// the drive is back under another name, is done again on the drive in the slot.
func TestBayHang(t *testing.T) {
	bay, _, s := bayDrive(t, slot.Config{MissingTimeout: time.Minute, ProbeTimeout: 500 * time.Millisecond})
	if err := bay.Pull("sdc", drivebay.PullHang); err != nil {
		t.Fatal(err)
	}
	p := random(64 << 10)
	done := returned(func() error { _, err := s.WriteAt(p, bayDataOff); return err })
	time.Sleep(100 * time.Millisecond)
	pending(t, "a write to a hung drive", done)
	st := s.Check()
	if st.Presence != slot.Missing || !strings.Contains(st.Reason, "did not answer") {
		t.Fatalf("Check of a hung drive: %+v", st)
	}
	t.Logf("missing: %s", st.Reason)
	if err := bay.Reinsert("sdc", "sdd"); err != nil {
		t.Fatal(err)
	}
	loop, err := bay.Attach("sdd")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reinsert(loop); err != nil {
		t.Fatal(err)
	}
	if err := result(t, "the stuck write", done); err != nil {
		t.Fatalf("the write stuck in the hung drive: %v", err)
	}
	mustEqual(t, "the stuck write", readAll(t, s, bayDataOff, 64<<10), p)
}

// TestBayMediumError: a range of a real drive that fails with EIO while the drive
// answers the probe is a medium error, and the drive stays in the slot.
func TestBayMediumError(t *testing.T) {
	bay, _, s := bayDrive(t, slot.Config{MissingTimeout: time.Minute})
	heal, err := bay.FailRange("sdc", bayDataOff, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReadAt(make([]byte, 8192), bayDataOff); !errors.Is(err, blockdev.ErrMedium) {
		t.Errorf("read of a bad range: %v, want a medium error", err)
	}
	if st := s.State(); st.Presence != slot.Present || st.Generation != 1 {
		t.Errorf("state after a medium error: %+v", st)
	}
	heal()
	if _, err := s.ReadAt(make([]byte, 8192), bayDataOff); err != nil {
		t.Errorf("read of the healed range: %v", err)
	}
}
