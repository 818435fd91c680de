package testutil

import (
	"crypto/sha256"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// VerifyTree checks that root holds every file of sums (paths relative to root, and
// the SHA-256 of their contents) with those contents. Other files (lost+found and the
// like) are ignored.
func VerifyTree(t testing.TB, root string, sums map[string][32]byte) {
	t.Helper()
	seen := 0
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		want, ok := sums[rel]
		if !ok {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if sha256.Sum256(data) != want {
			t.Errorf("%s: contents differ", rel)
		}
		seen++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != len(sums) {
		t.Errorf("found %d of the %d files written", seen, len(sums))
	}
}

// Allocated returns the bytes of storage allocated to the file at path (st_blocks),
// which punched holes and discards reduce.
func Allocated(t testing.TB, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}
