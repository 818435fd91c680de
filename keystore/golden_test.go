package keystore

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/registry"
)

// go test ./keystore -run TestGoldenKeystore -update writes the golden keystores of the
// current version (golden-v2*) by migrating those of version 1. Do it only for a new
// format version, under new names: the old ones must keep opening. Version 1's were
// written by the atrest of that version and are never rewritten.
var update = flag.Bool("update", false, "write the golden keystores of the current version in testdata/")

// The golden keystores: each of version 1 and the version 2 its migration gives. The
// "-rotating" ones are stopped in the middle of a rotation (journal, master.key.next).
var goldenPairs = [][2]string{{"golden-v1", "golden-v2"}, {"golden-v1-rotating", "golden-v2-rotating"}}

// installGolden copies a golden keystore into a keystore directory. Git keeps no modes:
// the files get the modes the keystore would have them in.
func installGolden(t *testing.T, name string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ks")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join("testdata", name)
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// migrate takes both locks and migrates, as the node does on its first locked change.
func migrate(t testing.TB, dir string) error {
	t.Helper()
	l, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	tx, err := registry.NewFileStore(dir).Begin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	return l.MigrateV1(tx)
}

func readFile(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkGoldenState: the keystore in dir is the golden one: its master key, one drive of
// volume "golden" at /dev/disk/by-id/golden-drive (missing here), and for a rotating one
// the journal with the drive in state wiping and the next key.
func checkGoldenState(t *testing.T, dir string, rotating bool) *Keystore {
	t.Helper()
	k, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s := k.State()
	if s.MasterKey.ID != KeyID(readFile(t, filepath.Join(dir, MasterKeyFile))) {
		t.Fatalf("state %+v", s)
	}
	if rotating {
		if s.Rotation == nil || s.Rotation.NewKey.ID != KeyID(readFile(t, filepath.Join(dir, NextKeyFile))) || s.Rotation.Drives[0].State != RotWiping {
			t.Fatalf("journal %+v", s.Rotation)
		}
	} else if s.Rotation != nil {
		t.Fatalf("journal %+v", s.Rotation)
	}
	var reg *registry.Registry
	if k.V1() {
		if reg, err = k.LegacyRegistry(); err != nil {
			t.Fatal(err)
		}
	} else {
		reg = loadRegistry(t, dir)
	}
	v := reg.Volume("golden")
	if len(reg.Drives) != 1 || v == nil || v.Layout != registry.LayoutSingle || v.Generation != 1 {
		t.Fatalf("registry %s", reg.Marshal())
	}
	d := reg.Drive(v.Members[0])
	if d.Path != "/dev/disk/by-id/golden-drive" || d.State != registry.DriveActive || d.KeyID != s.MasterKey.ID || d.SectorSize != 4096 {
		t.Fatalf("drive %+v", d)
	}
	h, err := drive.Check(d.Path, drive.UnlockOptions{ClusterUUID: k.ClusterUUID(), UUID: d.UUID, Keys: k.Keys})
	if err != nil || h.State != drive.StateMissing {
		t.Fatalf("check %+v, %v", h, err)
	}
	return k
}

// TestGoldenKeystore: keystores of version 1 keep opening, read and rewrite byte for
// byte, and migrate to exactly the golden keystores of version 2, which open too (and
// rewrite byte for byte, with their registry).
func TestGoldenKeystore(t *testing.T) {
	for _, pair := range goldenPairs {
		v1, v2 := pair[0], pair[1]
		rotating := v1 == "golden-v1-rotating"
		t.Run(v1, func(t *testing.T) {
			dir := installGolden(t, v1)
			k := checkGoldenState(t, dir, rotating)
			if !k.V1() || k.State().Version != FormatVersion1 || len(k.LegacyDrives()) != 1 {
				t.Fatalf("version 1 opened as %+v", k.State())
			}
			b := readFile(t, filepath.Join(dir, StateFile))
			s, drives, err := ParseState(b)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(marshalV1(s, drives), b) {
				t.Fatal("keystore.json version 1 does not rewrite byte for byte")
			}
			if err := migrate(t, dir); err != nil {
				t.Fatal(err)
			}
			if *update {
				writeGolden(t, dir, v2)
			}
			for _, f := range []string{StateFile, registry.FileName} {
				if !bytes.Equal(readFile(t, filepath.Join(dir, f)), readFile(t, filepath.Join("testdata", v2, f))) {
					t.Fatalf("the migration of %s does not give %s/%s", v1, v2, f)
				}
			}
		})
		t.Run(v2, func(t *testing.T) {
			dir := installGolden(t, v2)
			k := checkGoldenState(t, dir, rotating)
			if k.V1() || k.State().Version != FormatVersion {
				t.Fatalf("version 2 opened as %+v", k.State())
			}
			b := readFile(t, filepath.Join(dir, StateFile))
			s, drives, err := ParseState(b)
			if err != nil || drives != nil {
				t.Fatalf("%v, drives %v", err, drives)
			}
			if !bytes.Equal(s.Marshal(), b) {
				t.Fatal("keystore.json does not rewrite byte for byte")
			}
			if r := readFile(t, filepath.Join(dir, registry.FileName)); !bytes.Equal(loadRegistry(t, dir).Marshal(), r) {
				t.Fatal("registry.json does not rewrite byte for byte")
			}
			if err := migrate(t, dir); err != nil {
				t.Fatalf("migrating a version 2 keystore (nothing to do): %v", err)
			}
		})
	}
}

// writeGolden copies the keystore files of dir into testdata/name.
func writeGolden(t *testing.T, dir, name string) {
	to := filepath.Join("testdata", name)
	os.RemoveAll(to)
	if err := os.MkdirAll(to, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{MasterKeyFile, NextKeyFile, StateFile, registry.FileName} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
