package keystore

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/atrest/atrest/luks2/luks2test"
)

// go test ./keystore -run TestGoldenKeystore -update rewrites the golden keystores.
// Do it only for a new format version, under new names: the old ones must keep
// opening.
var update = flag.Bool("update", false, "rewrite the golden keystores in testdata/")

var goldenDirs = []string{"golden-v1", "golden-v1-rotating"}

// writeGoldenKeystores makes a keystore with one drive, and the same keystore
// stopped in the middle of a rotation (journal, master.key.next).
func writeGoldenKeystores(t *testing.T) {
	k, dir := newKeystore(t)
	img := luks2test.SparseImage(t, testDriveSize)
	if _, err := k.FormatDrive(img, FormatOptions{Volume: "golden"}); err != nil {
		t.Fatal(err)
	}
	k.state.Drives[0].Path = "/dev/disk/by-id/golden-drive"
	if err := k.save(); err != nil {
		t.Fatal(err)
	}
	copyGolden(t, dir, "golden-v1")
	k.state.Drives[0].Path = img
	func() {
		defer func() { recover() }()
		k.Rotate(context.Background(), RotateOptions{Step: func(s Step) {
			if s.Name == StepDriveVerified {
				panic(errCrash)
			}
		}})
	}()
	k.state.Drives[0].Path = "/dev/disk/by-id/golden-drive"
	if err := k.save(); err != nil {
		t.Fatal(err)
	}
	copyGolden(t, dir, "golden-v1-rotating")
}

func copyGolden(t *testing.T, from, name string) {
	to := filepath.Join("testdata", name)
	os.RemoveAll(to)
	if err := os.MkdirAll(to, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{MasterKeyFile, NextKeyFile, StateFile} {
		b, err := os.ReadFile(filepath.Join(from, f))
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(to, f), b, 0o644)
	}
}

// TestGoldenKeystore: keystores this version wrote keep opening, and their
// keystore.json reads and rewrites byte for byte.
func TestGoldenKeystore(t *testing.T) {
	if *update {
		writeGoldenKeystores(t)
	}
	for _, name := range goldenDirs {
		t.Run(name, func(t *testing.T) {
			// Git keeps no modes: install the files as the keystore would have them.
			dir := filepath.Join(t.TempDir(), "ks")
			os.Mkdir(dir, 0o700)
			src := filepath.Join("testdata", name)
			entries, err := os.ReadDir(src)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range entries {
				b, _ := os.ReadFile(filepath.Join(src, e.Name()))
				os.WriteFile(filepath.Join(dir, e.Name()), b, 0o600)
			}
			k, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			s := k.State()
			key, _ := os.ReadFile(filepath.Join(dir, MasterKeyFile))
			if s.MasterKey.ID != KeyID(key) || len(s.Drives) != 1 || s.Drives[0].Volume != "golden" || s.Drives[0].Path != "/dev/disk/by-id/golden-drive" {
				t.Fatalf("state %+v", s)
			}
			if name == "golden-v1-rotating" {
				next, _ := os.ReadFile(filepath.Join(dir, NextKeyFile))
				if s.Rotation == nil || s.Rotation.NewKey.ID != KeyID(next) || s.Rotation.Drives[0].State != RotWiping {
					t.Fatalf("journal %+v", s.Rotation)
				}
			}
			b, _ := os.ReadFile(filepath.Join(dir, StateFile))
			ps, err := ParseState(b)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(ps.Marshal(), b) {
				t.Fatal("keystore.json does not rewrite byte for byte")
			}
			st, err := k.Status()
			if err != nil {
				t.Fatal(err)
			}
			if st.Drives[0].State != StateAbsent {
				t.Fatalf("status %+v", st.Drives[0])
			}
		})
	}
}
