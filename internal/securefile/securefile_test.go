package securefile

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/atrest/atrest/internal/testutil"
)

// TestWriteAtomicFull: a write to a full file system fails naming the file once (the
// file's own errors name it), and leaves nothing behind.
func TestWriteAtomicFull(t *testing.T) {
	testutil.Root(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		testutil.Unavailable(t, "mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	const name = "keystore.json"
	err := WriteAtomic(dir, name, make([]byte, 1<<20))
	if !errors.Is(err, syscall.ENOSPC) || strings.Count(err.Error(), name) != 1 {
		t.Fatalf("write to a full file system: %v, want ENOSPC naming the file once", err)
	}
	left, _ := os.ReadDir(dir)
	if len(left) != 0 {
		t.Fatalf("left %v behind", left)
	}
}
