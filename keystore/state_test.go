package keystore

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestParseStateRelativePath: a drive path in keystore.json version 1 must be absolute;
// a relative one would name another file in each working directory.
func TestParseStateRelativePath(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "golden-v1", StateFile))
	if err != nil {
		t.Fatal(err)
	}
	const abs = `"/dev/disk/by-id/golden-drive"`
	if !bytes.Contains(b, []byte(abs)) {
		t.Fatalf("the golden keystore has no path %s", abs)
	}
	if _, _, err := ParseState(b); err != nil {
		t.Fatalf("the golden keystore: %v", err)
	}
	for _, rel := range []string{`"golden-drive"`, `"./golden-drive"`, `"../dev/golden-drive"`, `""`} {
		_, _, err := ParseState(bytes.Replace(b, []byte(abs), []byte(rel), 1))
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "not an absolute path") {
			t.Errorf("path %s: %v, want ErrCorrupt saying it is not absolute", rel, err)
		}
	}
}
