package drive

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/fusefs"
	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/luks2/luks2test"
)

// TestDriveInUse: a drive the daemon holds (Unlock with Exclusive) cannot be opened for
// a format or an adoption (Open with Exclusive) nor unlocked by a second daemon, and
// not a byte of it changes; a rewrap (a rotation) and a check still work beside it, and
// once the daemon lets go, the exclusive open works again.
func TestDriveInUse(t *testing.T) {
	old, new := newKey("mk-0123456789abcdef"), newKey("mk-1111111111111111")
	img, in := format(t, old, FormatOptions{})
	o := unlockOpts(old, new)
	o.Exclusive = true
	u, err := Unlock(img, o)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { u.Device.Close() }()
	data := randomBytes(8192)
	if _, err := u.Device.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	if err := u.Device.Flush(); err != nil {
		t.Fatal(err)
	}
	before := hashFile(t, img)
	for name, try := range map[string]func() error{
		"format or adopt": func() error {
			dev, err := Open(img, OpenOptions{Exclusive: true})
			if err == nil {
				dev.Close()
			}
			return err
		},
		"second daemon": func() error {
			o := o
			o.ReadOnly = true
			u2, err := Unlock(img, o)
			if err == nil {
				u2.Device.Close()
			}
			return err
		},
	} {
		err := try()
		if !errors.Is(err, blockdev.ErrInUse) || !strings.Contains(err.Error(), fmt.Sprintf("pid %d", os.Getpid())) {
			t.Errorf("%s of a served drive: %v, want blockdev.ErrInUse naming this process", name, err)
		}
	}
	if hashFile(t, img) != before {
		t.Fatal("a refused open changed the drive")
	}

	// A rewrap beside the daemon, through a shared open, and the served device goes on.
	dev := openRW(t, img)
	if err := Rewrap(dev, img, RewrapState{Phase: PhasePending, OldSlot: -1, NewSlot: -1}, RewrapOptions{
		Old: old, New: new, Token: token("vol0"), Record: func(string, RewrapState) error { return nil },
	}); err != nil {
		t.Fatalf("rewrap beside the daemon: %v", err)
	}
	dev.Close()
	got := make([]byte, len(data))
	if _, err := u.Device.ReadAt(got, 4096); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the served device after a rewrap: %v", err)
	}
	co := unlockOpts(new)
	co.UUID = in.UUID
	if h, err := Check(img, co); err != nil || h.State != StatePresent || h.KeyID != new.ID {
		t.Fatalf("check beside the daemon: %+v, %v", h, err)
	}

	u.Device.Close()
	dev, err = Open(img, OpenOptions{Exclusive: true})
	if err != nil {
		t.Fatalf("exclusive open once the daemon let go: %v", err)
	}
	dev.Close()
}

// brokenDrive is a drive that Unlock refuses; Check must say why, not present.
type brokenDrive struct {
	name   string
	break_ func(t *testing.T, img string)
	state  string // the Check state
	detail string // in the Check detail and the Unlock error
	class  error  // what the Unlock error wraps
}

func truncateTo(n int64) func(*testing.T, string) {
	return func(t *testing.T, img string) {
		if err := os.Truncate(img, n); err != nil {
			t.Fatal(err)
		}
	}
}

func editSegment(key, value string) func(*testing.T, string) {
	return func(t *testing.T, img string) {
		luks2test.EditJSON(t, img, func(root map[string]any) {
			root["segments"].(map[string]any)["0"].(map[string]any)[key] = value
		})
	}
}

// TestCheckAsUnlock: for each drive Unlock refuses, Check says what is wrong instead of
// present, with the same reason; none of them is blamed on the key.
func TestCheckAsUnlock(t *testing.T) {
	cases := []brokenDrive{
		{"truncated to 16 MiB", truncateTo(luks2.DataOffset), StateDamaged, "no whole 4096-byte sector", blockcrypt.ErrRegion},
		{"truncated to 32 KiB", truncateTo(2 * luks2.HeaderSize), StateDamaged, "beyond the end", luks2.ErrTruncated},
		{"truncated to 16 KiB", truncateTo(luks2.HeaderSize), StateDamaged, "beyond the end", luks2.ErrTruncated},
		{"data offset 2^62", editSegment("offset", fmt.Sprint(int64(1)<<62)), StateDamaged, "past the end", blockcrypt.ErrRegion},
		{"segment larger than the drive", editSegment("size", fmt.Sprint(1<<30)), StateDamaged, "does not fit", blockcrypt.ErrRegion},
		{"one AF stripe", func(t *testing.T, img string) {
			luks2test.EditJSON(t, img, func(root map[string]any) {
				for _, ks := range root["keyslots"].(map[string]any) {
					ks.(map[string]any)["af"].(map[string]any)["stripes"] = 1
				}
			})
		}, StateDamaged, "with 1 stripes", luks2.ErrUnsupported},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			key := newKey("mk-0123456789abcdef")
			img, _ := format(t, key, FormatOptions{})
			c.break_(t, img)
			checkRefused(t, img, key, c)
		})
	}
}

// checkRefused checks that Unlock refuses the drive at img with c.class, and that Check
// reports c.state with the same reason.
func checkRefused(t *testing.T, img string, key Key, c brokenDrive) {
	t.Helper()
	o := unlockOpts(key)
	o.ReadOnly = true
	u, err := Unlock(img, o)
	if err == nil {
		u.Device.Close()
		t.Fatal("Unlock opened the drive")
	}
	if !errors.Is(err, c.class) || errors.Is(err, luks2.ErrWrongKey) || errors.Is(err, luks2.ErrDamaged) ||
		!strings.Contains(err.Error(), c.detail) || strings.Contains(err.Error(), "does not open") {
		t.Errorf("Unlock: %v, want %v saying %q (not wrong key, not damaged)", err, c.class, c.detail)
	}
	h, err := Check(img, o)
	if err != nil {
		t.Fatal(err)
	}
	if h.State != c.state || !strings.Contains(h.Detail, c.detail) {
		t.Errorf("Check: %s (%s), want %s saying %q", h.State, h.Detail, c.state, c.detail)
	}
}

// TestCheckPulledDrive: a drive whose reads fail (a FUSE file over a device that vanished
// answers ENODEV, as a pulled drive does) is failed in Check, not damaged, and Unlock
// returns the I/O error.
func TestCheckPulledDrive(t *testing.T) {
	testutil.Root(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testutil.Unavailable(t, "no /dev/fuse: %v", err)
	}
	backing := luks2test.SparseImage(t, testDriveSize)
	lower, err := blockdev.OpenFile(backing, blockdev.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dev := blockdev.NewFaulty(lower)
	srv, err := fusefs.Mount(filepath.Join(t.TempDir(), "fuse"), []fusefs.File{{Name: "drive", Device: dev}}, fusefs.Options{})
	if err != nil {
		testutil.Unavailable(t, "FUSE mount: %v", err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Error(err)
		}
		srv.Wait()
		dev.Close()
	})
	img := srv.Path("drive")
	key := newKey("mk-0123456789abcdef")
	fd := openRW(t, img)
	if _, err := Format(fd, img, FormatOptions{Key: key, Token: token("vol0")}); err != nil {
		t.Fatal(err)
	}
	fd.Close()
	if err := dev.Flush(); err != nil {
		t.Fatal(err)
	}
	dev.Vanish()
	checkRefused(t, img, key, brokenDrive{state: StateFailed, detail: "no such device", class: syscall.ENODEV})
}
