package e2e

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/testutil"
)

// TestMountUmountAfterKill9: `kill -9` of the mount process leaves ext4 mounted on a
// loop device over a dead FUSE file; a new `atrest mount` there is refused (Busy) and
// says how to clean up; `atrest umount` removes the mount, the loop device
// (/sys/block/loop*/loop/backing_file) and the FUSE mount (/proc/self/mountinfo); a new
// mount then finds the data synced before the crash.
func TestMountUmountAfterKill9(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	d := c.serve(c.format("crash", "128M"))
	mp := filepath.Join(c.dir, "mnt")

	m := c.mount(d.uri("crash"), mp)
	file := m.fuseFile()
	sums := writeTree(t, mp, 200)
	syncAll()

	if err := m.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.done:
	case <-time.After(30 * time.Second):
		t.Fatal("atrest mount survived SIGKILL")
	}
	// What the crash left: all three pieces, the FUSE file dead.
	if !isMountpoint(t, mp) || len(loopsOver(t, file)) != 1 || !isMountpoint(t, filepath.Dir(file)) {
		t.Fatalf("after kill -9: mounted %v, loops %v, FUSE mounted %v; want all three left",
			isMountpoint(t, mp), loopsOver(t, file), isMountpoint(t, filepath.Dir(file)))
	}
	if _, err := os.Stat(file); !errors.Is(err, syscall.ENOTCONN) {
		t.Errorf("stat of the dead FUSE file: %v, want ENOTCONN", err)
	}

	r := c.run("mount", "--nbd", d.uri("crash"), mp)
	if r.code != exitcodes.Busy || !strings.Contains(r.stderr, "atrest umount") {
		t.Errorf("atrest mount over the crashed stack: exit %d, want %d with a hint to run atrest umount\n%s", r.code, exitcodes.Busy, r.stderr)
	}

	start := time.Now()
	if r := c.run("umount", mp); r.code != 0 {
		t.Fatalf("atrest umount after kill -9: exit %d\n%s", r.code, r.stderr)
	}
	t.Logf("atrest umount after kill -9 took %v", time.Since(start).Round(time.Millisecond))
	c.nothingLeft(mp, file)

	m2 := c.mount(d.uri("crash"), mp)
	if strings.Contains(m2.log.String(), "created") {
		t.Errorf("the mount after the crash created a new file system:\n%s", m2.log.String())
	}
	testutil.VerifyTree(t, mp, sums)
	m2.umount()
}
