package registry

import (
	"flag"
	"os"
	"path/filepath"
	"testing"
)

// go test ./registry -run TestGolden -update rewrites testdata/registry-v1.json. Do it
// only for a new format version, under a new name: the old files must keep parsing.
var update = flag.Bool("update", false, "rewrite the golden registry in testdata/")

func TestGolden(t *testing.T) {
	path := filepath.Join("testdata", "registry-v1.json")
	if *update {
		if err := os.WriteFile(path, sample(t).Marshal(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	r, err := Parse(b)
	if err != nil {
		t.Fatalf("the golden registry of format version 1 no longer parses: %v", err)
	}
	if string(r.Marshal()) != string(b) {
		t.Fatalf("the golden registry does not marshal back to the same bytes")
	}
	if v := r.Volume("m"); v == nil || v.Layout != LayoutMirror || len(r.VolumeDrives(v)) != 2 {
		t.Fatalf("golden mirror volume: %+v", v)
	}
}
