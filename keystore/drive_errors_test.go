package keystore

import (
	"bytes"
	"context"
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

// TestDriveInUse: a drive the daemon holds (Unlock with Exclusive) cannot be formatted
// or adopted, from this keystore or another one, and not a byte of it or of either
// registry changes; a rotation and a status still work beside it, and once the
// daemon lets go, formatting works again.
func TestDriveInUse(t *testing.T) {
	k, dir := newKeystore(t)
	img := luks2test.SparseImage(t, testDriveSize)
	if _, err := k.FormatDrive(img, FormatOptions{Volume: "served"}); err != nil {
		t.Fatal(err)
	}
	k.Close()
	daemon, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	u, err := daemon.Unlock(img, UnlockOptions{Exclusive: true})
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

	other, otherDir := newKeystore(t)
	k, err = OpenLocked(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	before, regBefore, otherBefore := hashFile(t, img), snapshot(t, dir), snapshot(t, otherDir)
	master := readMaster(t, dir)
	for name, try := range map[string]func() error{
		"format, same keystore":    func() error { _, err := k.FormatDrive(img, FormatOptions{}); return err },
		"format, another keystore": func() error { _, err := other.FormatDrive(img, FormatOptions{}); return err },
		"adopt, another keystore":  func() error { _, err := other.AdoptDrive(img, master, AdoptOptions{}); return err },
		"second daemon": func() error {
			u2, err := daemon.Unlock(img, UnlockOptions{Exclusive: true, ReadOnly: true})
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
	if hashFile(t, img) != before || snapshot(t, dir) != regBefore || snapshot(t, otherDir) != otherBefore {
		t.Fatal("a refused format or adopt changed the drive or a keystore")
	}

	// Rotation rewraps beside the daemon, and the served device goes on.
	if err := k.Rotate(context.Background(), RotateOptions{}); err != nil {
		t.Fatalf("rotation beside the daemon: %v", err)
	}
	got := make([]byte, len(data))
	if _, err := u.Device.ReadAt(got, 4096); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the served device after a rotation: %v", err)
	}
	if st, err := k.Status(); err != nil || st.Drives[0].State != StatePresent {
		t.Fatalf("status beside the daemon: %+v, %v", st, err)
	}

	u.Device.Close()
	if _, err := k.FormatDrive(img, FormatOptions{}); err != nil {
		t.Fatalf("format once the daemon let go: %v", err)
	}
}

// brokenDrive is a drive that the daemon refuses; Status must say why, not present.
type brokenDrive struct {
	name   string
	break_ func(t *testing.T, img string)
	state  string // the Status state
	detail string // in the Status detail and the Unlock error
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

// TestStatusAsUnlock: for each drive the daemon's Unlock refuses, Status says what is
// wrong instead of present, with the same reason; a drive that cannot be read is
// missing, not damaged.
func TestStatusAsUnlock(t *testing.T) {
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
			k, dir := newKeystore(t)
			img := luks2test.SparseImage(t, testDriveSize)
			if _, err := k.FormatDrive(img, FormatOptions{}); err != nil {
				t.Fatal(err)
			}
			c.break_(t, img)
			checkRefused(t, dir, img, c)
		})
	}
}

// checkRefused checks that Unlock refuses the drive at img with c.class, and that Status
// reports c.state with the same reason.
func checkRefused(t *testing.T, dir, img string, c brokenDrive) {
	t.Helper()
	k, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	u, err := k.Unlock(img, UnlockOptions{ReadOnly: true})
	if err == nil {
		u.Device.Close()
		t.Fatal("Unlock opened the drive")
	}
	if !errors.Is(err, c.class) || errors.Is(err, luks2.ErrWrongKey) || errors.Is(err, luks2.ErrDamaged) ||
		!strings.Contains(err.Error(), c.detail) || strings.Contains(err.Error(), "does not open") {
		t.Errorf("Unlock: %v, want %v saying %q (not wrong key, not damaged)", err, c.class, c.detail)
	}
	st, err := k.Status()
	if err != nil {
		t.Fatal(err)
	}
	if d := st.Drives[0]; d.State != c.state || d.Servable() || !strings.Contains(d.Detail, c.detail) {
		t.Errorf("Status: %s (%s), want %s saying %q", d.State, d.Detail, c.state, c.detail)
	}
}

// TestStatusPulledDrive: a drive whose reads fail (a FUSE file over a device that
// vanished answers ENODEV, as a pulled drive does) is missing in Status, and Unlock
// returns the I/O error, not a damaged header.
func TestStatusPulledDrive(t *testing.T) {
	testutil.Root(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testutil.Unavailable(t, "no /dev/fuse: %v", err)
	}
	k, dir := newKeystore(t)
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
	if _, err := k.FormatDrive(img, FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := dev.Flush(); err != nil {
		t.Fatal(err)
	}
	dev.Vanish()
	checkRefused(t, dir, img, brokenDrive{state: StateMissing, detail: "no such device", class: syscall.ENODEV})
}

// TestRotateTruncatedDrive: a rotation that meets a drive shorter than its header
// stops with ErrTruncated and does not blame the master key.
func TestRotateTruncatedDrive(t *testing.T) {
	k, _ := newKeystore(t)
	img := luks2test.SparseImage(t, testDriveSize)
	if _, err := k.FormatDrive(img, FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	truncateTo(2*luks2.HeaderSize)(t, img)
	err := k.Rotate(context.Background(), RotateOptions{})
	if !errors.Is(err, luks2.ErrTruncated) || errors.Is(err, luks2.ErrWrongKey) || strings.Contains(err.Error(), "does not open") {
		t.Fatalf("rotation over a truncated drive: %v, want ErrTruncated", err)
	}
}
