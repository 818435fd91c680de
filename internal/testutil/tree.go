package testutil

import (
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// WriteTree writes one file for each of sizes under root, in a few subdirectories,
// with the contents content(i, size) gives the i-th, fsyncs each one, and returns the
// SHA-256 of each by its path relative to root (what VerifyTree checks).
func WriteTree(t testing.TB, root string, sizes []int, content func(i, size int) []byte) map[string][32]byte {
	t.Helper()
	sums := map[string][32]byte{}
	for i, size := range sizes {
		rel := filepath.Join(fmt.Sprintf("d%d", i%3), fmt.Sprintf("s%d", i%2), fmt.Sprintf("f%d-%d", i, size))
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		data := content(i, size)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.Write(data)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
		sums[rel] = sha256.Sum256(data)
	}
	return sums
}

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
