package keystore

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/uuid"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/luks2/luks2test"
	"github.com/atrest/atrest/registry"
)

// The tests use the keystore as the node does: custody here, the drives in a registry
// (registry.FileStore in the same directory), drive operations from package drive. The
// helpers below are that node in miniature.

const testDriveSize = 32 << 20

func newKeystore(t testing.TB) (*Locked, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ks")
	l, err := Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, dir
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// change runs f on the registry under its lock and commits.
func change(t testing.TB, dir, cluster string, f func(r *registry.Registry) error) {
	t.Helper()
	tx, err := registry.NewFileStore(dir).Begin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	if tx.Registry().ClusterUUID == "" {
		tx.Reset(registry.New(cluster))
	}
	if err := f(tx.Registry()); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

// loadRegistry reads the registry of a migrated keystore.
func loadRegistry(t testing.TB, dir string) *registry.Registry {
	t.Helper()
	r, err := registry.NewFileStore(dir).Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// formatDrive formats a new image as the only member of a new volume and registers it.
func formatDrive(t testing.TB, l *Locked, dir string, ss int) (path, id string) {
	t.Helper()
	path = luks2test.SparseImage(t, testDriveSize)
	key, err := l.MasterKey()
	if err != nil {
		t.Fatal(err)
	}
	defer clear(key.Key)
	cluster := l.ClusterUUID()
	vol := registry.Volume{UUID: uuid.NewString(), Layout: registry.LayoutSingle, Created: l.now()}
	change(t, dir, cluster, func(r *registry.Registry) error {
		var err error
		vol.Name, err = r.NewVolumeName("")
		return err
	})
	dev, err := drive.Open(path, drive.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	in, err := drive.Format(dev, path, drive.FormatOptions{Key: key, SectorSize: ss,
		Token: luks2.AtrestToken{ClusterUUID: cluster, Volume: vol.Name, VolumeUUID: vol.UUID, MemberCount: 1}})
	dev.Close()
	if err != nil {
		t.Fatal(err)
	}
	change(t, dir, cluster, func(r *registry.Registry) error {
		return r.AddVolume(vol, []registry.Drive{{UUID: in.UUID, KeyID: key.ID, Path: path, SectorSize: ss, State: registry.DriveActive, Added: l.now()}})
	})
	return path, in.UUID
}

// formatDrives makes n drives with known data at offset 12345 of each.
func formatDrives(t testing.TB, l *Locked, dir string, n int) (paths []string, data [][]byte) {
	t.Helper()
	for i := range n {
		p, _ := formatDrive(t, l, dir, []int{4096, 512}[i%2])
		d := randomBytes(10000)
		writeThrough(t, dir, p, d, 12345)
		paths, data = append(paths, p), append(data, d)
	}
	return paths, data
}

// rotateDrives lists the active drives of the registry as Rotate takes them.
func rotateDrives(t testing.TB, dir string) []RotateDrive {
	t.Helper()
	return RotateDrives(loadRegistry(t, dir))
}

// rotate runs Rotate as the node does: the registry's active drives, and a Finish that
// records the outcome in the registry.
func rotate(t testing.TB, l *Locked, dir string, o RotateOptions) (*RotateOutcome, error) {
	t.Helper()
	o.Drives = rotateDrives(t, dir)
	cluster := l.ClusterUUID()
	o.Finish = func(out RotateOutcome) error {
		change(t, dir, cluster, out.Record)
		return nil
	}
	return l.Rotate(context.Background(), o)
}

// unlock opens a drive as the daemon does: a fresh snapshot's keys.
func unlock(t testing.TB, dir, path string, readOnly bool) (*drive.Unlocked, error) {
	t.Helper()
	k, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	return drive.Unlock(path, drive.UnlockOptions{ClusterUUID: k.ClusterUUID(), Keys: k.Keys, ReadOnly: readOnly})
}

// writeThrough writes data through an unlocked drive at off.
func writeThrough(t testing.TB, dir, path string, data []byte, off int64) {
	t.Helper()
	u, err := unlock(t, dir, path, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Device.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := u.Device.Close(); err != nil {
		t.Fatal(err)
	}
}

func readThrough(t testing.TB, dir, path string, n int, off int64) []byte {
	t.Helper()
	u, err := unlock(t, dir, path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Device.Close()
	b := make([]byte, n)
	if _, err := u.Device.ReadAt(b, off); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	return b
}

func readMaster(t testing.TB, dir string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, MasterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkRotated: every drive opens with the current master key in atrest and in
// cryptsetup, its data is unchanged, the old key opens nothing, and the registry names
// the current key for each.
func checkRotated(t testing.TB, dir string, paths []string, data [][]byte, oldKey []byte) {
	t.Helper()
	k, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	oldFile := luks2test.KeyFile(t, oldKey)
	reg := loadRegistry(t, dir)
	for i, p := range paths {
		if got := readThrough(t, dir, p, len(data[i]), 12345); !bytes.Equal(got, data[i]) {
			t.Fatalf("drive %d: data changed", i)
		}
		dev, err := luks2test.OpenReadOnly(p)
		if err != nil {
			t.Fatal(err)
		}
		h, err := luks2.Load(dev)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := h.Unlock(dev, oldKey); !errors.Is(err, luks2.ErrWrongKey) {
			t.Fatalf("drive %d: old key: %v", i, err)
		}
		if len(h.Keyslots()) != 1 {
			t.Fatalf("drive %d: %d keyslots after rotation", i, len(h.Keyslots()))
		}
		tok, _ := h.AtrestToken()
		if tok.MasterKeyID != k.State().MasterKey.ID {
			t.Fatalf("drive %d: token names %s", i, tok.MasterKeyID)
		}
		if d := reg.Drive(h.UUID()); d == nil || d.KeyID != k.State().MasterKey.ID || d.State != registry.DriveActive {
			t.Fatalf("drive %d: registry %+v", i, d)
		}
		dev.Close()
		if luks2test.InCryptsetup(t) {
			if ok, out := luks2test.Opens(t, p, filepath.Join(dir, MasterKeyFile)); !ok {
				t.Fatalf("drive %d: cryptsetup refuses the new master.key: %s", i, out)
			}
			if ok, _ := luks2test.Opens(t, p, oldFile); ok {
				t.Fatalf("drive %d: cryptsetup opens with the old key", i)
			}
		}
	}
	if k.State().Rotation != nil {
		t.Fatal("journal not cleared")
	}
	if _, err := os.Lstat(filepath.Join(dir, NextKeyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("master.key.next left behind: %v", err)
	}
}

// marshalV1 writes keystore.json version 1 as atrest wrote it before version 2 (for
// the golden files' byte-for-byte check and for v1 keystores made from live ones).
func marshalV1(s *State, drives []LegacyDrive) []byte {
	v1 := stateV1{State: *s, Drives: drives}
	v1.Version = FormatVersion1
	b, err := json.MarshalIndent(v1, "", "  ")
	if err != nil {
		panic(err)
	}
	return append(b, '\n')
}

// toV1 turns a live keystore of version 2 and its registry back into a keystore.json
// version 1 with the same drives, as a version 1 atrest would have left it, and removes
// registry.json.
func toV1(t testing.TB, dir string) {
	t.Helper()
	k, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	reg := loadRegistry(t, dir)
	drives := []LegacyDrive{}
	for _, d := range reg.Drives {
		v := reg.VolumeByUUID(d.VolumeUUID)
		state := LegacyActive
		if d.State == registry.DriveStale {
			state = LegacyOldKey
		}
		drives = append(drives, LegacyDrive{UUID: d.UUID, Volume: v.Name, VolumeUUID: v.UUID, MemberIndex: 0, MemberCount: 1,
			KeyID: d.KeyID, Path: d.Path, SectorSize: d.SectorSize, State: state, Added: d.Added})
	}
	s := k.State()
	if err := os.WriteFile(filepath.Join(dir, StateFile), marshalV1(&s, drives), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, registry.FileName)); err != nil {
		t.Fatal(err)
	}
}
