package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/fusefs"
	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/keystore"
)

// losetup attaches a loop device over file and returns its path; it is detached when
// the test ends.
func losetup(t *testing.T, file string) string {
	t.Helper()
	out, err := exec.Command("losetup", "--find", "--show", file).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup --find --show %s: %v: %s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// sparseFile creates a sparse file of size bytes.
func sparseFile(t *testing.T, path string, size int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestServedDriveHeld: a drive that `atrest serve` serves, an image file or a loop
// device, is refused by every command that would replace its header or data key
// (drive format with and without --force, with --create --force, drive adopt), run
// against the daemon's keystore or another cluster's, and by a second daemon: each
// exits with the Busy code, names the daemon, and not a byte of the drive or of either
// keystore changes while the volume keeps answering. Once the daemon stops, format
// works. (Rotation beside a serving daemon: TestServeRotationUnderFio.)
func TestServedDriveHeld(t *testing.T) {
	t.Parallel()
	t.Run("image", func(t *testing.T) {
		t.Parallel()
		c := newCluster(t)
		checkServedDriveHeld(t, c, c.format("held", "32M"))
	})
	t.Run("loop", func(t *testing.T) {
		t.Parallel()
		testutil.LoopAndFUSE(t, "losetup")
		c := newCluster(t)
		dev := losetup(t, sparseFile(t, filepath.Join(c.dir, "backing.img"), 32<<20))
		c.must("drive", "format", "--volume", "held", dev)
		checkServedDriveHeld(t, c, dev)
	})
}

func checkServedDriveHeld(t *testing.T, c *cluster, drive string) {
	d := c.serve(drive)
	cl := d.dial("held")
	data := randomBytes(64<<10, 7)
	if _, err := cl.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(); err != nil {
		t.Fatal(err)
	}
	other := newClusterIn(t, c.dir, "other-keystore")
	state := func() string {
		return hashFile(t, drive) + " " + hashFile(t, filepath.Join(c.ks, keystore.StateFile)) + " " +
			hashFile(t, filepath.Join(other.ks, keystore.StateFile))
	}
	before := state()
	holder := fmt.Sprintf("pid %d (%s serve", d.cmd.Process.Pid, atrestBin)
	refused := func(who *cluster, args ...string) {
		t.Helper()
		r := who.run(args...)
		if r.code != exitcodes.Busy || !strings.Contains(r.stderr, "device is in use") || !strings.Contains(r.stderr, holder) ||
			!strings.Contains(r.stderr, "hint: the drive is in use: 'atrest serve' serves it") {
			t.Errorf("atrest %s (keystore %s) of a served drive: exit %d, want %d naming %q:\n%s",
				strings.Join(args, " "), filepath.Base(who.ks), r.code, exitcodes.Busy, holder, r.stderr)
		}
	}
	for _, who := range []*cluster{c, other} {
		refused(who, "drive", "format", "--force", drive)
		refused(who, "drive", "format", drive)
		refused(who, "drive", "adopt", "--key-file", filepath.Join(c.ks, keystore.MasterKeyFile), drive)
	}
	if !strings.HasPrefix(drive, "/dev/") {
		refused(c, "drive", "format", "--create", "64M", "--force", drive)
	}
	c.refused(exitcodes.Busy, "device is in use", nil, spawnOpts{sock: filepath.Join(c.dir, "second.sock"), args: []string{drive}})
	if after := state(); after != before {
		t.Fatal("a refused command changed the drive or a keystore")
	}
	got := make([]byte, len(data))
	if _, err := cl.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the volume after the refusals: %v", err)
	}
	cl.Close()
	d.stop()
	c.must("drive", "format", "--force", "--volume", "reformatted", drive)
}

// TestPulledDrive: a drive whose reads fail (its FUSE server, this test, makes the device
// behind it vanish and answers ENODEV, as a pulled drive does), served as a file or through
// a loop device over that file: encryption-status says missing, and serve exits with
// the I/O code, without calling the header damaged or hinting at a header restore.
func TestPulledDrive(t *testing.T) {
	t.Parallel()
	for _, loop := range []bool{false, true} {
		t.Run(map[bool]string{false: "file", true: "loop"}[loop], func(t *testing.T) {
			t.Parallel()
			testutil.LoopAndFUSE(t, "losetup", "blockdev")
			c := newCluster(t)
			lower, err := blockdev.OpenFile(sparseFile(t, filepath.Join(c.dir, "backing.img"), 32<<20), blockdev.FileOptions{})
			if err != nil {
				t.Fatal(err)
			}
			dev := blockdev.NewFaulty(lower)
			srv, err := fusefs.Mount(filepath.Join(c.dir, "fuse"), []fusefs.File{{Name: "drive", Device: dev}}, fusefs.Options{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := srv.Unmount(); err != nil {
					t.Error(err)
				}
				srv.Wait()
				dev.Close()
			})
			drive := srv.Path("drive")
			if loop {
				drive = losetup(t, drive)
			}
			c.must("drive", "format", "--volume", "pulled", drive)
			if st := statusOf(t, c); st.Drives[0].State != "present" {
				t.Fatalf("before the pull: %+v", st.Drives[0])
			}
			dev.Vanish()
			if loop {
				// What the loop device cached would still read.
				mustProg(t, "", time.Minute, "blockdev", "--flushbufs", drive)
			}
			if st := statusOf(t, c); st.Drives[0].State != "missing" || !ioError(st.Drives[0].Detail) {
				t.Fatalf("a pulled drive: %+v, want missing with the I/O error", st.Drives[0])
			}
			d := c.spawn(spawnOpts{args: []string{drive}})
			r := d.wait(time.Minute)
			if r.code != exitcodes.IO || !ioError(r.stderr) ||
				strings.Contains(r.stderr, "damaged") || strings.Contains(r.stderr, "luksHeaderRestore") {
				t.Fatalf("serve of a pulled drive: exit %d, want %d with the I/O error and no header advice:\n%s", r.code, exitcodes.IO, r.stderr)
			}
		})
	}
}

// driveStatus is what `encryption-status --json` says of each drive (its schema is in
// docs/luks2-profile.md).
type driveStatus struct {
	State  string `json:"state"`
	Detail string `json:"detail"`
}

func statusOf(t *testing.T, c *cluster) (st struct{ Drives []driveStatus }) {
	t.Helper()
	if err := json.Unmarshal([]byte(c.must("encryption-status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// TestServeListenWarning: serve warns, once at start, that NBD carries plaintext when
// it listens on an address that is not loopback, and not when it is.
func TestServeListenWarning(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	img := c.format("vol", "32M")
	for _, addr := range []string{"tcp:127.0.0.1:0", "tcp:0.0.0.0:0"} {
		d := c.serve("--listen", addr, img)
		d.stop()
		warned := strings.Count(d.stderr.String(), "warning: listening on")
		if want := map[bool]int{true: 1, false: 0}[addr == "tcp:0.0.0.0:0"]; warned != want ||
			(want == 1 && !strings.Contains(d.stderr.String(), "NBD carries the volumes' plaintext")) {
			t.Errorf("serve --listen %s: %d warnings, want %d:\n%s", addr, warned, want, d.stderr.String())
		}
	}
}

// ioError reports whether s names the error of a pulled drive: ENODEV, or EIO where a
// layer in between turns it into that.
func ioError(s string) bool {
	return strings.Contains(s, "no such device") || strings.Contains(s, "input/output error")
}
