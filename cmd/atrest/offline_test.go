package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/luks2/luks2test"
	"github.com/atrest/atrest/node"
	"github.com/atrest/atrest/registry"
)

func newTestKeystore(t *testing.T) string {
	t.Helper()
	ks := filepath.Join(t.TempDir(), "keystore")
	if err := runInit(context.Background(), initOptions{keystore: ks, out: io.Discard}); err != nil {
		t.Fatal(err)
	}
	return ks
}

func format(t *testing.T, ks, path, volume string, o formatOptions) error {
	t.Helper()
	o.keystore, o.path, o.volume, o.out, o.errOut = ks, path, volume, io.Discard, io.Discard
	if o.sectorSize == 0 {
		o.sectorSize = 4096
	}
	return runFormat(context.Background(), o)
}

func exitCode(err error) int {
	var ce *cmdError
	if errors.As(err, &ce) {
		return ce.code
	}
	return exitcodes.Failure
}

// TestFormatVolumeNames: a drive gets the first free volN unless named; a name taken
// is refused as existing, a bad one as a usage error; the discard flag reaches the
// drive.
func TestFormatVolumeNames(t *testing.T) {
	ks := newTestKeystore(t)
	a := luks2test.SparseImage(t, 32<<20)
	if err := format(t, ks, a, "db", formatOptions{allowDiscards: true}); err != nil {
		t.Fatal(err)
	}
	if err := format(t, ks, luks2test.SparseImage(t, 32<<20), "db", formatOptions{}); exitCode(err) != exitcodes.Exists {
		t.Fatalf("taken name: %v", err)
	}
	if err := format(t, ks, luks2test.SparseImage(t, 32<<20), "../x", formatOptions{}); exitCode(err) != exitcodes.Usage {
		t.Fatalf("bad name: %v", err)
	}
	b := luks2test.SparseImage(t, 32<<20)
	if err := format(t, ks, b, "", formatOptions{}); err != nil {
		t.Fatal(err)
	}
	r, err := registry.NewFileStore(ks).Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Volumes) != 2 || r.Volumes[0].Name != "db" || r.Volumes[1].Name != "vol0" {
		t.Fatalf("volumes %+v", r.Volumes)
	}
	u, err := ksUnlock(t, ks, a, false)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Device.Close()
	if !u.Device.Caps().Trim || u.Token.Volume != "db" || u.Token.VolumeUUID != r.Volumes[0].UUID {
		t.Fatalf("%+v", u)
	}
}

// TestReformatReplacesEntry: formatting (forced) over a registered drive replaces its
// registry entry instead of leaving a stale one; its volume keeps its name unless
// another is given.
func TestReformatReplacesEntry(t *testing.T) {
	ks := newTestKeystore(t)
	img := luks2test.SparseImage(t, 32<<20)
	if err := format(t, ks, img, "db", formatOptions{}); err != nil {
		t.Fatal(err)
	}
	r1, _ := registry.NewFileStore(ks).Load(context.Background())
	if err := format(t, ks, img, "", formatOptions{force: true, sectorSize: 512}); err != nil {
		t.Fatal(err)
	}
	r2, _ := registry.NewFileStore(ks).Load(context.Background())
	if len(r2.Drives) != 1 || r2.Drives[0].UUID == r1.Drives[0].UUID || r2.Volumes[0].Name != "db" || r2.Drives[0].SectorSize != 512 {
		t.Fatalf("registry %s", r2.Marshal())
	}
	if err := format(t, ks, img, "db", formatOptions{force: true}); err != nil {
		t.Fatalf("same name on the replaced drive: %v", err)
	}
	if err := format(t, ks, img, "renamed", formatOptions{force: true}); err != nil {
		t.Fatalf("another name on the replaced drive: %v", err)
	}
	r3, _ := registry.NewFileStore(ks).Load(context.Background())
	if len(r3.Drives) != 1 || len(r3.Volumes) != 1 || r3.Volumes[0].Name != "renamed" {
		t.Fatalf("registry %s", r3.Marshal())
	}
	u, err := ksUnlock(t, ks, img, true)
	if err != nil {
		t.Fatal(err)
	}
	u.Device.Close()
	if u.Token.Volume != "renamed" || u.UUID != r3.Drives[0].UUID {
		t.Fatalf("%+v", u)
	}
}

// TestV1KeystoreMigratesOnFirstChange: the binary reads a keystore of version 1 (the
// golden one) without changing it, and the first command that takes the lock migrates
// it, keeping its drive.
func TestV1KeystoreMigratesOnFirstChange(t *testing.T) {
	bin := ksBuild(t)
	ks := filepath.Join(t.TempDir(), "keystore")
	os.Mkdir(ks, 0o700)
	src := filepath.Join("..", "..", "keystore", "testdata", "golden-v1")
	for _, f := range []string{keystore.MasterKeyFile, keystore.StateFile} {
		b, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(ks, f), b, 0o600)
	}
	v1, _ := os.ReadFile(filepath.Join(ks, keystore.StateFile))
	st := ksStatus(t, bin, ks)
	if len(st.Drives) != 1 || st.Drives[0].Volume != "golden" || st.Drives[0].State != node.DriveMissing {
		t.Fatalf("status of version 1: %+v", st)
	}
	if out := ksMust(t, bin, ks, "drive", "list"); !strings.Contains(out, "golden") {
		t.Fatalf("list: %s", out)
	}
	if now, _ := os.ReadFile(filepath.Join(ks, keystore.StateFile)); !bytes.Equal(now, v1) {
		t.Fatal("reading changed keystore.json")
	}
	if _, err := os.Stat(filepath.Join(ks, registry.FileName)); !os.IsNotExist(err) {
		t.Fatalf("reading wrote a registry: %v", err)
	}
	// A rotation refused (the golden drive is missing) has taken the lock: migrated.
	ksWant(t, ksRun(t, bin, ks, nil, "rotate-encryption-keys"), exitcodes.DriveMissing, "missing")
	var head struct{ Version int }
	b, _ := os.ReadFile(filepath.Join(ks, keystore.StateFile))
	if err := json.Unmarshal(b, &head); err != nil || head.Version != keystore.FormatVersion {
		t.Fatalf("keystore.json after a locked command: version %d, %v", head.Version, err)
	}
	d := filepath.Join(t.TempDir(), "d.img")
	ksMust(t, bin, ks, "drive", "format", "--create", "20M", d)
	st = ksStatus(t, bin, ks)
	if len(st.Drives) != 2 || st.Drives[0].Volume != "golden" || st.Drives[1].Volume != "vol0" || st.Drives[1].State != node.DrivePresent {
		t.Fatalf("status after the migration: %+v", st)
	}
}
