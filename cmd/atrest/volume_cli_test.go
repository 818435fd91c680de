package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/atrest/atrest/internal/exitcodes"
)

// TestVolumeRemove: volume list shows the volumes; volume remove takes one out of the
// registry with its drive, which keeps its data and can be adopted back with master.key.
func TestVolumeRemove(t *testing.T) {
	bin, dir, ks := ksCluster(t)
	a, b := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", "--volume", "keep", a)
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", "--volume", "gone", b)
	if out := ksMust(t, bin, ks, "volume", "list"); !strings.Contains(out, "keep") || !strings.Contains(out, "gone") || !strings.Contains(out, "single") {
		t.Fatalf("volume list: %s", out)
	}
	if out := ksMust(t, bin, ks, "volume", "remove", "gone"); !strings.Contains(out, "Removed volume gone") {
		t.Fatalf("volume remove: %s", out)
	}
	if out := ksMust(t, bin, ks, "volume", "list"); strings.Contains(out, "gone") {
		t.Fatalf("volume list after the removal: %s", out)
	}
	if out := ksMust(t, bin, ks, "drive", "list"); strings.Contains(out, b) {
		t.Fatalf("drive list after the removal: %s", out)
	}
	ksWant(t, ksRun(t, bin, ks, nil, "volume", "remove", "gone"), exitcodes.Failure, "not found")
	ksWant(t, ksRun(t, bin, ks, nil, "volume", "remove", "../x"), exitcodes.Usage, "volume name")
	// The drive kept its header and data: master.key adopts it back.
	out := ksMust(t, bin, ks, "drive", "adopt", "--key-file", filepath.Join(ks, "master.key"), "--volume", "back", b)
	if !strings.Contains(out, "Adopted "+b) {
		t.Fatalf("adopt the removed drive: %s", out)
	}
}

// TestDriveShow: a drive is found by UUID, a unique prefix of 8 characters and its path;
// a prefix that is too short is refused and says why, an unknown drive is not found.
func TestDriveShow(t *testing.T) {
	bin, dir, ks := ksCluster(t)
	a := filepath.Join(dir, "a.img")
	out := ksMust(t, bin, ks, "drive", "format", "--create", "20M", a)
	id := strings.Fields(strings.SplitN(out, "drive ", 2)[1])[0]
	id = strings.TrimSuffix(id, ",")
	for _, name := range []string{id, id[:8], a} {
		if got := ksMust(t, bin, ks, "drive", "show", name); !strings.Contains(got, id) || !strings.Contains(got, "present") {
			t.Errorf("drive show %s: %s", name, got)
		}
	}
	ksWant(t, ksRun(t, bin, ks, nil, "drive", "show", id[:4]), exitcodes.Failure, "at least 8 characters")
	ksWant(t, ksRun(t, bin, ks, nil, "drive", "show", "ffffffff-ffff"), exitcodes.Failure, "not")
}
