package blockdev_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/testutil"
)

// checkExclusive runs the rules of FileOptions.Exclusive on path: a second exclusive
// open, read-write or read-only, is refused with ErrInUse naming the holder (want), an
// open without Exclusive beside it reads and writes, and the hold goes with Close.
func checkExclusive(t *testing.T, path, want string) {
	t.Helper()
	a, err := blockdev.OpenFile(path, blockdev.FileOptions{Exclusive: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, ro := range []bool{false, true} {
		b, err := blockdev.OpenFile(path, blockdev.FileOptions{Exclusive: true, ReadOnly: ro})
		if err == nil {
			b.Close()
			t.Fatalf("a second exclusive open (read-only %v) succeeded", ro)
		}
		if !errors.Is(err, blockdev.ErrInUse) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), want) {
			t.Fatalf("second exclusive open (read-only %v): %v, want ErrInUse naming %s and %q", ro, err, path, want)
		}
	}
	shared, err := blockdev.OpenFile(path, blockdev.FileOptions{})
	if err != nil {
		t.Fatalf("an open without Exclusive beside an exclusive one: %v", err)
	}
	msg := []byte("written beside the exclusive holder")
	if _, err := shared.WriteAt(msg, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := a.ReadAt(got, 4096); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("the holder reads %q, %v", got, err)
	}
	shared.Close()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := blockdev.OpenFile(path, blockdev.FileOptions{Exclusive: true})
	if err != nil {
		t.Fatalf("exclusive open after the holder closed: %v", err)
	}
	b.Close()
}

func TestExclusiveFile(t *testing.T) {
	path := newSparseFile(t, "", 1<<20)
	checkExclusive(t, path, fmt.Sprintf("locked by pid %d", os.Getpid()))
}

// TestExclusiveFileOtherProcess: the holder is another process (flock(1)), which the
// error names.
func TestExclusiveFileOtherProcess(t *testing.T) {
	flock := testutil.Tool(t, "flock")
	path := newSparseFile(t, "", 1<<20)
	ready := filepath.Join(t.TempDir(), "ready")
	cmd := exec.Command(flock, "--exclusive", path, "sh", "-c", "touch "+ready+"; exec sleep 600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("flock(1) did not take the lock within 30 s")
		}
	}
	_, err := blockdev.OpenFile(path, blockdev.FileOptions{Exclusive: true})
	want := fmt.Sprintf("locked by pid %d (%s --exclusive %s", cmd.Process.Pid, flock, path)
	if !errors.Is(err, blockdev.ErrInUse) || !strings.Contains(err.Error(), want) {
		t.Fatalf("exclusive open of a file flock(1) holds: %v, want ErrInUse naming %q", err, want)
	}
	f, err := blockdev.OpenFile(path, blockdev.FileOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("a shared open: %v", err)
	}
	f.Close()
}

func TestExclusiveLoopDevice(t *testing.T) {
	dev, _ := newLoopDevice(t, 1<<20)
	checkExclusive(t, dev, fmt.Sprintf("open in pid %d", os.Getpid()))
}

// TestExclusiveMounted: the kernel refuses an exclusive open of a mounted block
// device, and the error names the mount point.
func TestExclusiveMounted(t *testing.T) {
	mkfs := testutil.Tool(t, "mkfs.ext4")
	dev, _ := newLoopDevice(t, 8<<20)
	if out, err := exec.Command(mkfs, "-q", "-F", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	mp := filepath.Join(t.TempDir(), "mount point")
	if err := os.Mkdir(mp, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", dev, mp).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mp).CombinedOutput(); err != nil {
			t.Errorf("umount: %v: %s", err, out)
		}
	})
	_, err := blockdev.OpenFile(dev, blockdev.FileOptions{Exclusive: true, ReadOnly: true})
	if !errors.Is(err, blockdev.ErrInUse) || !strings.Contains(err.Error(), "mounted at "+mp) {
		t.Fatalf("exclusive open of a mounted device: %v, want ErrInUse naming the mount point", err)
	}
}
