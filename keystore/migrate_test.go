package keystore

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/atrest/atrest/internal/securefile"
	"github.com/atrest/atrest/registry"
)

// drivesOf lists what a keystore directory says of its drives, from keystore.json
// version 1 or from the registry: the registry either way (LegacyRegistry for version 1).
func drivesOf(t testing.TB, dir string) string {
	t.Helper()
	k, err := Open(dir)
	if err != nil {
		t.Fatalf("the keystore does not open: %v", err)
	}
	if k.V1() {
		r, err := k.LegacyRegistry()
		if err != nil {
			t.Fatal(err)
		}
		return string(r.Marshal())
	}
	return string(loadRegistry(t, dir).Marshal())
}

// errMigrationCrash stands for the process dying in a write of the migration.
var errMigrationCrash = errors.New("crash in the migration")

// TestMigrateCrashAtEveryWrite makes a keystore of version 1 with drives (one of them
// stale, one in a rotation stopped half way), then migrates it, crashing before the
// rename of each write in turn (securefile.TestHookBeforeRename: a crash there is a
// crash between two writes, with a stray temporary file); after each crash the keystore
// opens and shows the same drives, the next locked change finishes the migration, and
// the rotation then resumes and finishes.
func TestMigrateCrashAtEveryWrite(t *testing.T) {
	for stop := 0; ; stop++ {
		l, dir := newKeystore(t)
		paths, data := formatDrives(t, l, dir, 3)
		os.Rename(paths[1], paths[1]+".pulled")
		if _, err := rotate(t, l, dir, RotateOptions{Force: true}); err != nil {
			t.Fatal(err)
		}
		oldKey := readMaster(t, dir)
		if !crashRotation(t, l, dir, 7) { // the second drive's rewrap started
			t.Fatal("no crash")
		}
		toV1(t, dir)
		want := drivesOf(t, dir)

		n := 0
		securefile.TestHookBeforeRename = func(_, name string) {
			if n == stop {
				panic(errMigrationCrash)
			}
			n++
		}
		crashed := func() (crashed bool) {
			defer func() {
				if r := recover(); r != nil {
					if r != errMigrationCrash {
						panic(r)
					}
					crashed = true
				}
			}()
			if err := migrate(t, dir); err != nil {
				t.Fatal(err)
			}
			return false
		}()
		securefile.TestHookBeforeRename = nil
		if got := drivesOf(t, dir); got != want {
			t.Fatalf("stop %d: the drives changed:\n%s\nwant\n%s", stop, got, want)
		}
		k, _ := Open(dir)
		if crashed == !k.V1() {
			t.Fatalf("stop %d: crashed %v, version %d", stop, crashed, k.State().Version)
		}
		if !crashed {
			t.Logf("crashed at each of %d writes", stop)
			return
		}
		if err := migrate(t, dir); err != nil {
			t.Fatalf("stop %d: the migration after the crash: %v", stop, err)
		}
		if k, _ := Open(dir); k.V1() || drivesOf(t, dir) != want {
			t.Fatalf("stop %d: after the second migration: version %d", stop, k.State().Version)
		}
		l2, err := Lock(dir)
		if err != nil {
			t.Fatal(err)
		}
		out, err := rotate(t, l2, dir, RotateOptions{})
		l2.Close()
		if err != nil || !out.Resumed {
			t.Fatalf("stop %d: the rotation after the migration: %+v, %v", stop, out, err)
		}
		checkRotated(t, dir, []string{paths[0], paths[2]}, [][]byte{data[0], data[2]}, oldKey)
		if d := loadRegistry(t, dir).Drives[1]; d.State != registry.DriveStale {
			t.Fatalf("stop %d: the stale drive: %+v", stop, d)
		}
	}
}

// TestV1RefusesChanges: a keystore.json of version 1 gives no master key and runs no
// rotation until migrated (a drive recorded meanwhile in a registry that the migration
// then derives again from version 1 would be lost), and a failed migration leaves it as
// it was.
func TestV1RefusesChanges(t *testing.T) {
	l, dir := newKeystore(t)
	formatDrives(t, l, dir, 1)
	l.Close()
	toV1(t, dir)
	l2, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	before := snapshot(t, dir)
	if _, err := l2.MasterKey(); !errors.Is(err, ErrNotMigrated) {
		t.Fatalf("master key of version 1: %v", err)
	}
	if _, err := l2.Rotate(context.Background(), RotateOptions{}); !errors.Is(err, ErrNotMigrated) {
		t.Fatalf("rotation of version 1: %v", err)
	}
	if snapshot(t, dir) != before {
		t.Fatal("a refused change wrote something")
	}
	// A drive list that makes no registry (two drives of one volume name, which no
	// atrest wrote but version 1 does not forbid) is refused, and nothing is written.
	l2.Close()
	l3, dir3 := newKeystore(t)
	formatDrives(t, l3, dir3, 2)
	l3.Close()
	toV1(t, dir3)
	if err := editState(dir3, `"volume": "vol1"`, `"volume": "vol0"`); err != nil {
		t.Fatal(err)
	}
	before = snapshot(t, dir3)
	if err := migrate(t, dir3); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "vol0") {
		t.Fatalf("migration of a volume name used twice: %v", err)
	}
	if snapshot(t, dir3) != before {
		t.Fatal("a refused migration wrote something")
	}
}

// TestMigrateKeepsRegistryOfV2: a version 2 keystore's registry is not touched by
// MigrateV1, and a registry.json beside a version 1 keystore.json (left by a migration
// that crashed) is replaced by the one version 1 describes.
func TestMigrateKeepsRegistryOfV2(t *testing.T) {
	l, dir := newKeystore(t)
	formatDrives(t, l, dir, 2)
	l.Close()
	reg := readFile(t, filepath.Join(dir, registry.FileName))
	if err := migrate(t, dir); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, filepath.Join(dir, registry.FileName)), reg) {
		t.Fatal("MigrateV1 changed the registry of a version 2 keystore")
	}
	toV1(t, dir)
	want := drivesOf(t, dir)
	// A registry.json that does not match version 1's drives (one volume renamed).
	stray := bytes.Replace(reg, []byte(`"name": "vol0"`), []byte(`"name": "stray"`), 1)
	if err := os.WriteFile(filepath.Join(dir, registry.FileName), stray, 0o600); err != nil {
		t.Fatal(err)
	}
	if drivesOf(t, dir) != want {
		t.Fatal("a reader used registry.json beside keystore.json version 1")
	}
	if err := migrate(t, dir); err != nil {
		t.Fatal(err)
	}
	if drivesOf(t, dir) != want || !bytes.Equal(readFile(t, filepath.Join(dir, registry.FileName)), []byte(want)) {
		t.Fatal("the migration kept the stray registry")
	}
}
