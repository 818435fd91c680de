package keystore

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/atrest/atrest/internal/testutil"
)

// TestParseStateRelativePath: a drive path in keystore.json must be absolute; a
// relative one would name another file in each working directory.
func TestParseStateRelativePath(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "golden-v1", StateFile))
	if err != nil {
		t.Fatal(err)
	}
	const abs = `"/dev/disk/by-id/golden-drive"`
	if !bytes.Contains(b, []byte(abs)) {
		t.Fatalf("the golden keystore has no path %s", abs)
	}
	if _, err := ParseState(b); err != nil {
		t.Fatalf("the golden keystore: %v", err)
	}
	for _, rel := range []string{`"golden-drive"`, `"./golden-drive"`, `"../dev/golden-drive"`, `""`} {
		_, err := ParseState(bytes.Replace(b, []byte(abs), []byte(rel), 1))
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "not an absolute path") {
			t.Errorf("path %s: %v, want ErrCorrupt saying it is not absolute", rel, err)
		}
	}
}

// TestWriteAtomicFull: a write to a full file system fails naming the file once (the
// file's own errors name it), and leaves nothing behind.
func TestWriteAtomicFull(t *testing.T) {
	testutil.Root(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		testutil.Unavailable(t, "mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	err := writeAtomic(dir, StateFile, make([]byte, 1<<20))
	if !errors.Is(err, syscall.ENOSPC) || strings.Count(err.Error(), StateFile) != 1 {
		t.Fatalf("write to a full file system: %v, want ENOSPC naming the file once", err)
	}
	emptyDir, _ := os.ReadDir(dir)
	if len(emptyDir) != 0 {
		t.Fatalf("left %v behind", emptyDir)
	}
}
