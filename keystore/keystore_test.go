package keystore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/internal/securefile"
	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/luks2/luks2test"
	"github.com/atrest/atrest/registry"
)

func hashFile(t testing.TB, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestInit(t *testing.T) {
	l, dir := newKeystore(t)
	for name, mode := range map[string]os.FileMode{".": 0o700 | os.ModeDir, MasterKeyFile: 0o600, StateFile: 0o600, LockFile: 0o600} {
		fi, err := os.Lstat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != mode {
			t.Errorf("%s: mode %v, want %v", name, fi.Mode(), mode)
		}
	}
	key, _ := os.ReadFile(filepath.Join(dir, MasterKeyFile))
	if len(key) != MasterKeySize || KeyID(key) != l.State().MasterKey.ID {
		t.Fatalf("master key of %d bytes, id %s vs %s", len(key), KeyID(key), l.State().MasterKey.ID)
	}
	if s := l.State(); s.Version != FormatVersion || l.V1() || l.LegacyDrives() != nil {
		t.Fatalf("a new keystore is version %d", s.Version)
	}
	l.Close()
	if _, err := Init(dir); !errors.Is(err, ErrExists) {
		t.Fatalf("second init: %v", err)
	}
	k2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if k2.ClusterUUID() != l.ClusterUUID() || k2.Dir() != dir {
		t.Fatal("cluster UUID changed")
	}
	if _, err := Open(filepath.Join(dir, "nope")); !errors.Is(err, ErrNoKeystore) {
		t.Fatalf("missing dir: %v", err)
	}
	if _, err := Lock(filepath.Join(dir, "nope")); !errors.Is(err, ErrNoKeystore) {
		t.Fatalf("missing dir, locked: %v", err)
	}

	// A registry without a keystore is someone's inventory: init leaves it alone.
	dir2 := filepath.Join(t.TempDir(), "ks")
	os.Mkdir(dir2, 0o700)
	os.WriteFile(filepath.Join(dir2, registry.FileName), []byte("{}"), 0o600)
	if _, err := Init(dir2); !errors.Is(err, ErrExists) {
		t.Fatalf("init beside a registry: %v", err)
	}
}

// TestInitResume: an init killed after writing master.key and before keystore.json
// (the state made here by removing keystore.json) is finished by the next init, with
// the key it left; keystore.json alone, or master.key.next, still refuses.
func TestInitResume(t *testing.T) {
	l, dir := newKeystore(t)
	l.Close()
	key := readMaster(t, dir)
	if err := os.Remove(filepath.Join(dir, StateFile)); err != nil {
		t.Fatal(err)
	}
	l2, err := Init(dir)
	if err != nil {
		t.Fatalf("init after an interrupted one: %v", err)
	}
	if !l2.InitResumed() || l2.State().MasterKey.ID != KeyID(key) || !bytes.Equal(readMaster(t, dir), key) {
		t.Fatalf("resumed %v with key %s, want the key left behind, %s", l2.InitResumed(), l2.State().MasterKey.ID, KeyID(key))
	}
	l2.Close()
	if _, err := Open(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := Init(dir); !errors.Is(err, ErrExists) {
		t.Fatalf("init over a whole keystore: %v", err)
	}

	// A master.key that is not a key is refused, not replaced.
	dir2 := filepath.Join(t.TempDir(), "ks")
	if err := os.Mkdir(dir2, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir2, MasterKeyFile), []byte("short"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Init(dir2); !errors.Is(err, ErrCorrupt) || !errors.Is(err, ErrStrayKey) {
		t.Fatalf("init over a short master.key: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir2, MasterKeyFile)); string(b) != "short" {
		t.Fatal("a refused master.key was changed")
	}
}

// describe is an error's text with the fix an UnsafeError carries.
func describe(err error) string {
	if ue := (*securefile.UnsafeError)(nil); errors.As(err, &ue) {
		return err.Error() + " (fix: " + ue.Fix + ")"
	}
	return fmt.Sprint(err)
}

// TestStickyParent: a world-writable parent with the sticky bit (/tmp, /var/tmp) is
// accepted, as it is by OpenSSH.
func TestStickyParent(t *testing.T) {
	testutil.Root(t)
	l, dir := newKeystore(t)
	l.Close()
	if err := os.Chmod(filepath.Dir(dir), os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); err != nil {
		t.Fatalf("open under a sticky world-writable parent: %v", err)
	}
	if err := os.Chmod(filepath.Dir(dir), 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); !errors.Is(err, ErrUnsafe) || !strings.Contains(describe(err), "chmod go-w "+filepath.Dir(dir)) {
		t.Fatalf("open under a world-writable parent: %v", describe(err))
	}
}

func TestLock(t *testing.T) {
	l, dir := newKeystore(t)
	if _, err := Lock(dir); !errors.Is(err, ErrBusy) {
		t.Fatalf("second locker: %v", err)
	}
	if _, err := Open(dir); err != nil {
		t.Fatalf("a reader needs no lock: %v", err)
	}
	l.Close()
	l2, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	l2.Close()
	// A Locked closed no longer changes anything.
	if _, err := l2.MasterKey(); !errors.Is(err, errClosed) {
		t.Fatalf("MasterKey after Close: %v", err)
	}
	if _, err := l2.Rotate(context.Background(), RotateOptions{}); !errors.Is(err, errClosed) {
		t.Fatalf("Rotate after Close: %v", err)
	}
}

// TestUnsafeKeystoreRefused: each unsafe or corrupt keystore is refused with an error
// that names the file (and, for an unsafe one, the fix), and no file changes.
func TestUnsafeKeystoreRefused(t *testing.T) {
	testutil.Root(t)
	cases := map[string]struct {
		break_ func(dir string) error
		want   string
		err    error
	}{
		"dir mode":  {func(d string) error { return os.Chmod(d, 0o755) }, "chmod 0700", ErrUnsafe},
		"key mode":  {func(d string) error { return os.Chmod(filepath.Join(d, MasterKeyFile), 0o640) }, "chmod 0600", ErrUnsafe},
		"json mode": {func(d string) error { return os.Chmod(filepath.Join(d, StateFile), 0o604) }, "keystore.json has mode", ErrUnsafe},
		"lock mode": {func(d string) error { return os.Chmod(filepath.Join(d, LockFile), 0o660) }, "lock has mode", ErrUnsafe},
		"key owner": {func(d string) error { return os.Chown(filepath.Join(d, MasterKeyFile), 1234, 0) }, "owned by uid 1234", ErrUnsafe},
		"dir owner": {func(d string) error { return os.Chown(d, 1234, 1234) }, "chown root:root", ErrUnsafe},
		"key symlink": {func(d string) error {
			p := filepath.Join(d, MasterKeyFile)
			os.Rename(p, p+".real")
			return os.Symlink(p+".real", p)
		}, "master.key is a symlink", ErrUnsafe},
		"json symlink": {func(d string) error {
			p := filepath.Join(d, StateFile)
			os.Rename(p, filepath.Join(d, "elsewhere"))
			return os.Symlink("elsewhere", p)
		}, "keystore.json is a symlink", ErrUnsafe},
		"dir symlink":     {nil, "is a symlink", ErrUnsafe},
		"parent writable": {func(d string) error { return os.Chmod(filepath.Dir(d), 0o777) }, "writable by group or others", ErrUnsafe},
		"parent owner":    {func(d string) error { return os.Chown(filepath.Dir(d), 1234, 0) }, "is owned by uid 1234", ErrUnsafe},
		"key not regular": {func(d string) error {
			p := filepath.Join(d, MasterKeyFile)
			os.Remove(p)
			return os.Mkdir(p, 0o700)
		}, "not a regular file", ErrUnsafe},
		"truncated json": {func(d string) error {
			p := filepath.Join(d, StateFile)
			b, _ := os.ReadFile(p)
			return os.WriteFile(p, b[:len(b)/2], 0o600)
		}, "unexpected end of JSON", ErrCorrupt},
		"empty json":     {func(d string) error { return os.WriteFile(filepath.Join(d, StateFile), nil, 0o600) }, "keystore.json", ErrCorrupt},
		"future version": {func(d string) error { return editState(d, `"version": 2`, `"version": 3`) }, "version 3", ErrCorrupt},
		"unknown field":  {func(d string) error { return editState(d, `"rotation": null`, `"rotation": null, "x": 1`) }, "unknown field", ErrCorrupt},
		"drives in v2":   {func(d string) error { return editState(d, `"rotation": null`, `"rotation": null, "drives": []`) }, "unknown field", ErrCorrupt},
		"short key":      {func(d string) error { return os.WriteFile(filepath.Join(d, MasterKeyFile), []byte("short"), 0o600) }, "not a 32-byte master key", ErrCorrupt},
		"long key":       {func(d string) error { return os.WriteFile(filepath.Join(d, MasterKeyFile), make([]byte, 5000), 0o600) }, "master.key is 5000 bytes", ErrCorrupt},
		"other key": {func(d string) error {
			return os.WriteFile(filepath.Join(d, MasterKeyFile), bytes.Repeat([]byte{1}, 32), 0o600)
		}, "but keystore.json names", ErrCorrupt},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			l, dir := newKeystore(t)
			l.Close()
			open := dir
			if c.break_ == nil {
				open = dir + ".link"
				if err := os.Symlink(dir, open); err != nil {
					t.Fatal(err)
				}
			} else if err := c.break_(dir); err != nil {
				t.Fatal(err)
			}
			before := snapshot(t, dir)
			_, err := Open(open)
			if !errors.Is(err, c.err) || !strings.Contains(describe(err), c.want) {
				t.Fatalf("open: got %v, want %v naming %q", describe(err), c.err, c.want)
			}
			_, err = Lock(open)
			if !errors.Is(err, c.err) || !strings.Contains(describe(err), c.want) {
				t.Fatalf("lock: got %v, want %v naming %q", describe(err), c.err, c.want)
			}
			if after := snapshot(t, dir); after != before {
				t.Fatalf("refusing changed the keystore:\n%s\n%s", before, after)
			}
		})
	}
}

func editState(dir, old, new string) error {
	p := filepath.Join(dir, StateFile)
	b, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	if !bytes.Contains(b, []byte(old)) {
		return fmt.Errorf("%q not in keystore.json", old)
	}
	return os.WriteFile(p, bytes.Replace(b, []byte(old), []byte(new), 1), 0o600)
}

// snapshot describes every file of a directory: name, mode and content hash.
func snapshot(t testing.TB, dir string) string {
	t.Helper()
	var b strings.Builder
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		fi, _ := os.Lstat(p)
		fmt.Fprintf(&b, "%s %v", e.Name(), fi.Mode())
		if fi.Mode().IsRegular() {
			fmt.Fprintf(&b, " %x", hashFile(t, p))
		}
		b.WriteString("\n")
	}
	return b.String()
}

func TestRotate(t *testing.T) {
	l, dir := newKeystore(t)
	paths, data := formatDrives(t, l, dir, 3)
	oldKey := readMaster(t, dir)
	oldID := l.State().MasterKey.ID
	var steps []string
	// A reader in "another process" unlocks every drive at every step.
	out, err := rotate(t, l, dir, RotateOptions{Step: func(s Step) {
		steps = append(steps, s.Name)
		for i, p := range paths {
			if got := readThrough(t, dir, p, len(data[i]), 12345); !bytes.Equal(got, data[i]) {
				t.Fatalf("at %s: drive %d reads wrong data", s.Name, i)
			}
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("steps: %v", steps)
	if len(steps) != 2+5*3+5 || steps[len(steps)-1] != StepFinished || steps[len(steps)-2] != StepOutcome {
		t.Fatalf("steps %v", steps)
	}
	st := l.State()
	if st.MasterKey.ID == oldID || st.LastRotation == nil || !st.LastRotation.Equal(out.Time) || bytes.Equal(readMaster(t, dir), oldKey) {
		t.Fatal("master key not replaced")
	}
	if out.OldKeyID != oldID || out.NewKeyID != st.MasterKey.ID || len(out.Rewrapped) != 3 || len(out.Stale) != 0 || out.Resumed {
		t.Fatalf("outcome %+v", out)
	}
	checkRotated(t, dir, paths, data, oldKey)
	k, _ := Open(dir)
	for _, p := range paths {
		if h, err := drive.Check(p, drive.UnlockOptions{ClusterUUID: k.ClusterUUID(), Keys: k.Keys}); err != nil || h.State != drive.StatePresent || h.KeyID != st.MasterKey.ID {
			t.Fatalf("check %+v, %v", h, err)
		}
	}
}

// TestOpenAcrossRotation: a whole rotation in another process between Open's read of
// keystore.json and its read of master.key leaves a pair that does not match; Open
// reads the state again and opens the keystore as it is after the rotation.
func TestOpenAcrossRotation(t *testing.T) {
	l, dir := newKeystore(t)
	paths, data := formatDrives(t, l, dir, 1)
	oldID := l.State().MasterKey.ID
	rotations := 0
	testHookStateRead = func() {
		if rotations == 0 {
			rotations++
			if _, err := rotate(t, l, dir, RotateOptions{}); err != nil {
				t.Error(err)
			}
		}
	}
	defer func() { testHookStateRead = nil }()
	r, err := Open(dir)
	if err != nil {
		t.Fatalf("open across a rotation: %v", err)
	}
	testHookStateRead = nil
	if rotations != 1 {
		t.Fatal("the rotation did not run")
	}
	if id := r.State().MasterKey.ID; id == oldID || id != l.State().MasterKey.ID {
		t.Fatalf("opened with master key %s; old %s, new %s", id, oldID, l.State().MasterKey.ID)
	}
	if got := readThrough(t, dir, paths[0], len(data[0]), 12345); !bytes.Equal(got, data[0]) {
		t.Fatal("drive reads wrong data after the rotation")
	}
}

func TestRotateAbsentDrive(t *testing.T) {
	l, dir := newKeystore(t)
	paths, data := formatDrives(t, l, dir, 3)
	ids := rotateDrives(t, dir)
	oldKey := readMaster(t, dir)
	pulled := paths[1] + ".pulled"
	os.Rename(paths[1], pulled)
	before := snapshot(t, dir)
	_, err := rotate(t, l, dir, RotateOptions{})
	var me *MissingError
	if !errors.As(err, &me) || !errors.Is(err, ErrDriveMissing) || len(me.Drives) != 1 || me.Rewrapping || !strings.Contains(err.Error(), paths[1]) {
		t.Fatalf("absent drive: %v", err)
	}
	if snapshot(t, dir) != before {
		t.Fatal("a refused rotation changed the keystore")
	}
	out, err := rotate(t, l, dir, RotateOptions{Force: true})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(out.Stale) != fmt.Sprint([]string{ids[1].UUID}) || len(out.Rewrapped) != 2 {
		t.Fatalf("outcome %+v", out)
	}
	checkRotated(t, dir, []string{paths[0], paths[2]}, [][]byte{data[0], data[2]}, oldKey)
	if d := loadRegistry(t, dir).Drive(ids[1].UUID); d.State != registry.DriveStale || d.KeyID == l.State().MasterKey.ID {
		t.Fatalf("pulled drive: %+v", d)
	}
	// The pulled drive is locked to the old key for good: the old key opens it,
	// the new one does not, even when it comes back.
	os.Rename(pulled, paths[1])
	if _, err := unlock(t, dir, paths[1], true); !errors.Is(err, luks2.ErrWrongKey) {
		t.Fatalf("new key on the pulled drive: %v", err)
	}
	dev, _ := luks2test.OpenReadOnly(paths[1])
	defer dev.Close()
	h, _ := luks2.Load(dev)
	if _, _, err := h.Unlock(dev, oldKey); err != nil {
		t.Fatalf("old key on the pulled drive: %v", err)
	}
	// A second rotation leaves it alone.
	if out, err := rotate(t, l, dir, RotateOptions{}); err != nil || len(out.Stale) != 0 {
		t.Fatalf("second rotation: %+v, %v", out, err)
	}
}

// errCrash stands for the process dying at a step.
var errCrash = errors.New("crash")

// crashRotation runs a rotation that panics at its stop-th step (counting from 0), as a
// process dying there; it reports whether it crashed. The lock is dropped after, as a
// dead process drops it.
func crashRotation(t testing.TB, l *Locked, dir string, stop int) (crashed bool) {
	t.Helper()
	return crashRotationWith(t, l, dir, stop, RotateOptions{})
}

func crashRotationWith(t testing.TB, l *Locked, dir string, stop int, o RotateOptions) (crashed bool) {
	t.Helper()
	defer l.Close()
	defer func() {
		if r := recover(); r != nil {
			if r != errCrash {
				panic(r)
			}
			crashed = true
		}
	}()
	n := 0
	o.Step = func(s Step) {
		if n == stop {
			panic(errCrash)
		}
		n++
	}
	if _, err := rotate(t, l, dir, o); err != nil {
		t.Fatal(err)
	}
	return false
}

// TestRotateCrashAtEveryStep stops a forced rotation (one drive pulled) at every step
// boundary (a panic out of the step callback, the lock then dropped), checks that every
// drive opens with a key the keystore gives and that a keystore with no rotation under
// way has its outcome in the registry, then reruns; the rerun finishes the rotation and
// records the outcome in the registry (called again after a crash that followed
// Finish).
func TestRotateCrashAtEveryStep(t *testing.T) {
	for stop := 0; ; stop++ {
		l, dir := newKeystore(t)
		paths, data := formatDrives(t, l, dir, 3)
		pulled := rotateDrives(t, dir)[2].UUID
		os.Rename(paths[2], paths[2]+".pulled")
		paths, data = paths[:2], data[:2]
		oldKey := readMaster(t, dir)
		if !crashRotationWith(t, l, dir, stop, RotateOptions{Force: true}) {
			t.Logf("crashed at each of %d steps", stop)
			return
		}
		k, err := Open(dir)
		if err != nil {
			t.Fatalf("stop %d: keystore does not open after the crash: %v", stop, err)
		}
		for i, p := range paths {
			if got := readThrough(t, dir, p, len(data[i]), 12345); !bytes.Equal(got, data[i]) {
				t.Fatalf("stop %d: drive %d", stop, i)
			}
		}
		if st := k.State(); st.Rotation == nil {
			// Not started, or finished: then the registry has its outcome.
			finished := st.LastRotation != nil
			for _, d := range loadRegistry(t, dir).Drives {
				if d.UUID == pulled && (d.State == registry.DriveStale) != finished || d.UUID != pulled && d.KeyID != st.MasterKey.ID {
					t.Fatalf("stop %d: no rotation under way, and the registry has drive %+v (master key %s)", stop, d, st.MasterKey.ID)
				}
			}
		}
		l2, err := Lock(dir)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := rotate(t, l2, dir, RotateOptions{Force: true}); err != nil {
			t.Fatalf("stop %d: rerun: %v", stop, err)
		}
		l2.Close()
		checkRotated(t, dir, paths, data, oldKey)
		if d := loadRegistry(t, dir).Drive(pulled); d.State != registry.DriveStale {
			t.Fatalf("stop %d: the pulled drive: %+v", stop, d)
		}
	}
}

// TestRotateDuringRotation: at every step, a reader in "another process" opens the
// keystore, sees the rotation under way, and finds every drive present (Check, the
// status's view) with a key the keystore gives.
func TestRotateDuringRotation(t *testing.T) {
	l, dir := newKeystore(t)
	paths, _ := formatDrives(t, l, dir, 2)
	rewrapping := false
	if _, err := rotate(t, l, dir, RotateOptions{Step: func(s Step) {
		k, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		r := k.State().Rotation
		if s.Name != StepFinished && s.Name != StepNextKeyWritten && r == nil {
			t.Fatalf("at %s: no rotation under way", s.Name)
		}
		if r != nil && (r.Drives[0].State == RotAdding || r.Drives[0].State == RotWiping) {
			rewrapping = true
		}
		for _, p := range paths {
			h, err := drive.Check(p, drive.UnlockOptions{ClusterUUID: k.ClusterUUID(), Keys: k.Keys})
			if err != nil || h.State != drive.StatePresent {
				t.Fatalf("at %s: %s: %+v, %v", s.Name, p, h, err)
			}
		}
	}}); err != nil {
		t.Fatal(err)
	}
	if !rewrapping {
		t.Fatal("no step saw a drive being rewrapped")
	}
}

// TestMasterKeyDuringRotation: while the journal records a rotation, the master key is
// not handed out for a new drive (it would be left out of the rotation and locked out
// when the old key is destroyed); the rerun that finishes the rotation hands it out
// again.
func TestMasterKeyDuringRotation(t *testing.T) {
	l, dir := newKeystore(t)
	formatDrives(t, l, dir, 1)
	if !crashRotation(t, l, dir, 3) {
		t.Fatal("no crash")
	}
	l2, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	if _, err := l2.MasterKey(); !errors.Is(err, ErrRotationUnderWay) {
		t.Fatalf("master key during a rotation: %v", err)
	}
	if _, err := rotate(t, l2, dir, RotateOptions{}); err != nil {
		t.Fatal(err)
	}
	key, err := l2.MasterKey()
	if err != nil || key.ID != l2.State().MasterKey.ID || KeyID(key.Key) != key.ID {
		t.Fatalf("master key after the rotation: %s, %v", key.ID, err)
	}
}

// TestRotateResumeNeedsItsDrives: a resumed rotation must be given the drives its
// journal still has to rewrap; a drive missing in the middle of its rewrap is refused
// even with Force.
func TestRotateResumeNeedsItsDrives(t *testing.T) {
	l, dir := newKeystore(t)
	paths, data := formatDrives(t, l, dir, 1)
	oldKey := readMaster(t, dir)
	// Stop after drive-start: the drive is being rewrapped.
	if !crashRotation(t, l, dir, 2) {
		t.Fatal("no crash")
	}
	l2, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	if j := l2.State().Rotation; j == nil || j.Drives[0].State != RotAdding {
		t.Fatalf("journal %+v", j)
	}
	before := snapshot(t, dir)
	if _, err := l2.Rotate(context.Background(), RotateOptions{}); err == nil || !strings.Contains(err.Error(), "not among the drives given") {
		t.Fatalf("resume without the drives: %v", err)
	}
	os.Rename(paths[0], paths[0]+".pulled")
	_, err = rotate(t, l2, dir, RotateOptions{Force: true})
	var me *MissingError
	if !errors.As(err, &me) || !me.Rewrapping {
		t.Fatalf("resume with the drive missing mid-rewrap: %v", err)
	}
	if snapshot(t, dir) != before {
		t.Fatal("a refused resume changed the keystore")
	}
	os.Rename(paths[0]+".pulled", paths[0])
	if out, err := rotate(t, l2, dir, RotateOptions{}); err != nil || !out.Resumed {
		t.Fatalf("resume: %+v, %v", out, err)
	}
	checkRotated(t, dir, paths, data, oldKey)
}

// TestRotateTruncatedDrive: a rotation that meets a drive shorter than its header stops
// with ErrTruncated and does not blame the master key.
func TestRotateTruncatedDrive(t *testing.T) {
	l, dir := newKeystore(t)
	paths, _ := formatDrives(t, l, dir, 1)
	if err := os.Truncate(paths[0], 2*luks2.HeaderSize); err != nil {
		t.Fatal(err)
	}
	_, err := rotate(t, l, dir, RotateOptions{})
	if !errors.Is(err, luks2.ErrTruncated) || errors.Is(err, luks2.ErrWrongKey) || strings.Contains(err.Error(), "does not open") {
		t.Fatalf("rotation over a truncated drive: %v, want ErrTruncated", err)
	}
}

// TestRotateBesideDaemon: a rotation rewraps a drive that the daemon holds exclusively
// and serves, and the served device goes on reading what was written through it.
func TestRotateBesideDaemon(t *testing.T) {
	l, dir := newKeystore(t)
	paths, _ := formatDrives(t, l, dir, 1)
	k, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	u, err := drive.Unlock(paths[0], drive.UnlockOptions{ClusterUUID: k.ClusterUUID(), Keys: k.Keys, Exclusive: true})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Device.Close()
	data := randomBytes(8192)
	if _, err := u.Device.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	if err := u.Device.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := rotate(t, l, dir, RotateOptions{}); err != nil {
		t.Fatalf("rotation beside the daemon: %v", err)
	}
	got := make([]byte, len(data))
	if _, err := u.Device.ReadAt(got, 4096); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the served device after a rotation: %v", err)
	}
	if h, err := drive.Check(paths[0], drive.UnlockOptions{ClusterUUID: k.ClusterUUID(), Keys: k.Keys}); err != nil || h.State != drive.StatePresent || h.KeyID != l.State().MasterKey.ID {
		t.Fatalf("check beside the daemon: %+v, %v", h, err)
	}
}
