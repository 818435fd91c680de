package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMountSIGTERMWithFileOpen: SIGTERM reaches the mount process (systemd stopping the
// unit) while a file is open on the volume. The file system cannot be unmounted, so it
// is detached lazily: the mount point is gone at once, but the volume is still served
// to the open file, which can write and fsync; once it is closed, the loop device is
// released, the FUSE mount ended and the process exits 0. What was written is there on
// the next mount.
func TestMountSIGTERMWithFileOpen(t *testing.T) {
	t.Parallel()
	requireMount(t)
	c := newCluster(t)
	d := c.serve(c.format("busy", "64M"))
	mp := filepath.Join(c.dir, "mnt")
	m := c.mount(d.uri("busy"), mp)
	file := m.fuseFile()

	f, err := os.Create(filepath.Join(mp, "open"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	first := treeContent(1, 1<<20)
	if _, err := f.Write(first); err != nil {
		t.Fatal(err)
	}
	if err := m.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(m.log.String(), "detaching it lazily"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) || m.exited() {
			t.Fatalf("no lazy detach after SIGTERM with a file open:\n%s", m.log.String())
		}
	}
	if isMountpoint(t, mp) {
		t.Error("the mount point is still there after the lazy detach")
	}
	if len(loopsOver(t, file)) != 1 || m.exited() {
		t.Fatal("the volume under the open file was taken away")
	}
	second := treeContent(2, 1<<20)
	if _, err := f.Write(second); err != nil {
		t.Fatalf("write to the open file after the lazy detach: %v", err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync of the open file after the lazy detach: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("atrest mount still runs 30 s after the last file was closed:\n%s", m.log.String())
	}
	if code := m.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("atrest mount exited with %d:\n%s", code, m.log.String())
	}
	c.nothingLeft(mp, file)

	m2 := c.mount(d.uri("busy"), mp)
	got, err := os.ReadFile(filepath.Join(mp, "open"))
	if err != nil || !bytes.Equal(got, append(first, second...)) {
		t.Errorf("the file written across the lazy detach reads back wrong (%v, %d bytes)", err, len(got))
	}
	m2.umount()
}
