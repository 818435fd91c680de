package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/internal/exitcodes"
)

// TestMountErrors: what `atrest mount` and `atrest umount` refuse, with which exit code
// and hint, leaving nothing behind.
func TestMountErrors(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	d := c.serve(c.format("err", "64M"))
	mp := filepath.Join(c.dir, "mnt")
	if err := os.MkdirAll(mp, 0o755); err != nil {
		t.Fatal(err)
	}

	refused := func(code int, want string, args ...string) {
		t.Helper()
		r := c.run(args...)
		if r.code != code || !strings.Contains(r.stderr, want) {
			t.Errorf("atrest %s: exit %d, want %d with %q\n%s", strings.Join(args, " "), r.code, code, want, r.stderr)
		}
		if isMountpoint(t, mp) || fileExists(stateFile(mp)) {
			t.Errorf("atrest %s left a mount or a state file behind", strings.Join(args, " "))
			c.run("umount", mp)
		}
	}
	refused(exitcodes.IO, "is the daemon running", "mount", "--nbd", "nbd+unix:///err?socket="+filepath.Join(c.dir, "nobody.sock"), mp)
	refused(exitcodes.DriveMissing, "no export named", "mount", "--nbd", d.uri("nope"), mp)
	// With --background the child's refusal reaches the parent through the pipe.
	refused(exitcodes.DriveMissing, "no export named", "mount", "--background", "--nbd", d.uri("nope"), mp)
	refused(exitcodes.Usage, "--nbd", "mount", "--nbd", "http://example/x", mp)
	refused(exitcodes.Usage, "one MOUNTPOINT", "mount", "--nbd", d.uri("err"))
	refused(exitcodes.Usage, "only ext4", "mount", "--nbd", d.uri("err"), "--fs", "xfs", mp)

	// A mount point that holds something else: mount refuses it, umount leaves it.
	if err := unix.Mount("tmpfs", mp, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(mp, unix.MNT_DETACH) })
	r := c.run("mount", "--nbd", d.uri("err"), mp)
	if r.code != exitcodes.Busy || !strings.Contains(r.stderr, "already has") {
		t.Errorf("mount over a tmpfs: exit %d, want %d\n%s", r.code, exitcodes.Busy, r.stderr)
	}
	// umount refuses a mount of something else (Busy: the mount point is in use), and
	// says that nothing is mounted, or that the path does not exist (Failure): never
	// a silent success.
	r = c.run("umount", mp)
	if r.code != exitcodes.Busy || !strings.Contains(r.stderr, "not an atrest volume") || !strings.Contains(r.stderr, "umount(8)") {
		t.Errorf("umount of a tmpfs: exit %d, want %d with a hint\n%s", r.code, exitcodes.Busy, r.stderr)
	}
	if !isMountpoint(t, mp) {
		t.Fatal("atrest umount removed a tmpfs it did not mount")
	}
	if err := unix.Unmount(mp, 0); err != nil {
		t.Fatal(err)
	}
	refused(exitcodes.Failure, "nothing is mounted on "+mp, "umount", mp)
	refused(exitcodes.Failure, filepath.Join(mp, "nope")+" does not exist", "umount", filepath.Join(mp, "nope"))
	refused(exitcodes.Usage, "one MOUNTPOINT", "umount")

	// The record of a mount whose process is gone, with nothing mounted: umount
	// removes it, says so and succeeds.
	stale := `{"mountpoint": "` + mp + `", "fuse_dir": "` + filepath.Join(c.dir, "fuse") + `", "file": "` + filepath.Join(c.dir, "fuse", "err") +
		`", "pid": 1073741824, "start_time": 1, "nbd": "` + d.uri("err") + `", "export": "err"}`
	if err := os.MkdirAll(filepath.Dir(stateFile(mp)), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stateFile(mp), []byte(stale), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(stateFile(mp)) })
	r = c.run("umount", mp)
	if r.code != 0 || !strings.Contains(r.stderr, "nothing was mounted on "+mp+"; removed the stale record") {
		t.Errorf("umount with a stale state file: exit %d, want 0 saying what it removed\n%s", r.code, r.stderr)
	}
	if fileExists(stateFile(mp)) {
		t.Error("the stale state file is still there")
	}

	// Files open on the volume: umount refuses and changes nothing.
	m := c.mount(d.uri("err"), mp)
	f, err := os.Create(filepath.Join(mp, "open"))
	if err != nil {
		t.Fatal(err)
	}
	r = c.run("umount", mp)
	if r.code != exitcodes.Busy || !strings.Contains(r.stderr, "close the files") {
		t.Errorf("umount with a file open: exit %d, want %d\n%s", r.code, exitcodes.Busy, r.stderr)
	}
	if !isMountpoint(t, mp) || m.exited() {
		t.Fatal("a refused umount took the volume down")
	}
	f.Close()
	m.umount()
}
