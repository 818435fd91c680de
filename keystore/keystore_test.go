package keystore

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/luks2/luks2test"
)

const testDriveSize = 32 << 20

func newKeystore(t testing.TB) (*Keystore, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ks")
	k, err := Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k, dir
}

func hashFile(t testing.TB, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestInit(t *testing.T) {
	k, dir := newKeystore(t)
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
	if len(key) != MasterKeySize || KeyID(key) != k.State().MasterKey.ID {
		t.Fatalf("master key of %d bytes, id %s vs %s", len(key), KeyID(key), k.State().MasterKey.ID)
	}
	k.Close()
	if _, err := Init(dir); !errors.Is(err, ErrExists) {
		t.Fatalf("second init: %v", err)
	}
	k2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if k2.State().ClusterUUID != k.State().ClusterUUID {
		t.Fatal("cluster UUID changed")
	}
	if _, err := Open(filepath.Join(dir, "nope")); !errors.Is(err, ErrNoKeystore) {
		t.Fatalf("missing dir: %v", err)
	}
}

// TestInitResume: an init killed after writing master.key and before keystore.json
// (the state made here by removing keystore.json) is finished by the next init, with
// the key it left; keystore.json alone, or master.key.next, still refuses.
func TestInitResume(t *testing.T) {
	k, dir := newKeystore(t)
	k.Close()
	key := readMaster(t, dir)
	if err := os.Remove(filepath.Join(dir, StateFile)); err != nil {
		t.Fatal(err)
	}
	k2, err := Init(dir)
	if err != nil {
		t.Fatalf("init after an interrupted one: %v", err)
	}
	if !k2.InitResumed() || k2.State().MasterKey.ID != KeyID(key) || !bytes.Equal(readMaster(t, dir), key) {
		t.Fatalf("resumed %v with key %s, want the key left behind, %s", k2.InitResumed(), k2.State().MasterKey.ID, KeyID(key))
	}
	k2.Close()
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
	if _, err := Init(dir2); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("init over a short master.key: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir2, MasterKeyFile)); string(b) != "short" {
		t.Fatal("a refused master.key was changed")
	}
}

// TestStickyParent: a world-writable parent with the sticky bit (/tmp, /var/tmp) is
// accepted, as it is by OpenSSH.
func TestStickyParent(t *testing.T) {
	testutil.Root(t)
	k, dir := newKeystore(t)
	k.Close()
	if err := os.Chmod(filepath.Dir(dir), os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); err != nil {
		t.Fatalf("open under a sticky world-writable parent: %v", err)
	}
	if err := os.Chmod(filepath.Dir(dir), 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); !errors.Is(err, ErrUnsafe) || !strings.Contains(withFix(err), "chmod go-w "+filepath.Dir(dir)) {
		t.Fatalf("open under a world-writable parent: %v", err)
	}
}

// withFix is the message of err with the fix of an UnsafeError after it; it fails
// the test if the message itself carries a hint (cmd/atrest prints the fix as one).
func withFix(err error) string {
	if err == nil {
		return ""
	}
	msg := err.Error()
	if strings.Contains(msg, "hint") {
		panic("a keystore error carries a hint: " + msg)
	}
	var ue *UnsafeError
	if errors.As(err, &ue) {
		msg += " (fix: " + ue.Fix + ")"
	}
	return msg
}

func TestLock(t *testing.T) {
	k, dir := newKeystore(t)
	if _, err := OpenLocked(dir); !errors.Is(err, ErrBusy) {
		t.Fatalf("second locker: %v", err)
	}
	if _, err := Open(dir); err != nil {
		t.Fatalf("a reader needs no lock: %v", err)
	}
	k.Close()
	k2, err := OpenLocked(dir)
	if err != nil {
		t.Fatal(err)
	}
	k2.Close()
}

// TestUnsafeKeystoreRefused: each unsafe or corrupt keystore is refused with an
// error that names the file, and no file changes.
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
		"dir symlink":     {nil, "replace it with the directory it points to", ErrUnsafe},
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
		"future version": {func(d string) error { return editState(d, `"version": 1`, `"version": 2`) }, "version 2", ErrCorrupt},
		"unknown field":  {func(d string) error { return editState(d, `"drives": []`, `"drives": [], "x": 1`) }, "unknown field", ErrCorrupt},
		"short key":      {func(d string) error { return os.WriteFile(filepath.Join(d, MasterKeyFile), []byte("short"), 0o600) }, "not a 32-byte master key", ErrCorrupt},
		"other key": {func(d string) error {
			return os.WriteFile(filepath.Join(d, MasterKeyFile), bytes.Repeat([]byte{1}, 32), 0o600)
		}, "but keystore.json names", ErrCorrupt},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			k, dir := newKeystore(t)
			k.Close()
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
			for _, f := range []func(string) (*Keystore, error){Open, OpenLocked} {
				_, err := f(open)
				if msg := withFix(err); !errors.Is(err, c.err) || !strings.Contains(msg, c.want) {
					t.Fatalf("got %s, want %v naming %q", msg, c.err, c.want)
				}
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

// writeThrough writes data through an unlocked drive at off.
func writeThrough(t testing.TB, k *Keystore, path string, data []byte, off int64) {
	t.Helper()
	u, err := k.Unlock(path, UnlockOptions{})
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

func readThrough(t testing.TB, k *Keystore, path string, n int, off int64) []byte {
	t.Helper()
	u, err := k.Unlock(path, UnlockOptions{ReadOnly: true})
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

// pythonDecrypt decrypts n bytes of the data segment at segment offset off (a
// sector multiple) with python3-cryptography, as dm-crypt would: aes-xts-plain64,
// IV = offset / 512 whatever the sector size.
const pythonXTS = `
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
img, key, data_off, off, n, ss, mode = sys.argv[1], bytes.fromhex(sys.argv[2]), *map(int, sys.argv[3:8])
f = open(img, 'r+b')
out = b''
for o in range(off, off + n, ss):
    c = Cipher(algorithms.AES(key), modes.XTS((o // 512).to_bytes(16, 'little')))
    f.seek(data_off + o)
    if mode == 0:
        out += c.decryptor().update(f.read(ss))
    else:
        pt = sys.stdin.buffer.read(ss)
        f.seek(data_off + o)
        f.write(c.encryptor().update(pt))
sys.stdout.buffer.write(out)
`

func python(t testing.TB, img string, key []byte, off int64, n, ss int, encrypt []byte) []byte {
	t.Helper()
	mode := "0"
	if encrypt != nil {
		mode = "1"
	}
	cmd := exec.Command(testutil.Python3(t), "-c", pythonXTS, img, fmt.Sprintf("%x", key),
		fmt.Sprint(luks2.DataOffset), fmt.Sprint(off), fmt.Sprint(n), fmt.Sprint(ss), mode)
	cmd.Stdin = bytes.NewReader(encrypt)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("python: %v\n%s", err, stderr.String())
	}
	return out
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestFormatInterop: a drive atrest formats opens in cryptsetup with master.key,
// gives the data key atrest used, and data written through atrest decrypts in
// python3-cryptography (IV in 512-byte units) at both sector sizes.
func TestFormatInterop(t *testing.T) {
	luks2test.Cryptsetup(t)
	for _, ss := range []int{4096, 512} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			k, dir := newKeystore(t)
			img := luks2test.SparseImage(t, testDriveSize)
			d, err := k.FormatDrive(img, FormatOptions{SectorSize: ss})
			if err != nil {
				t.Fatal(err)
			}
			if d.Volume != "vol0" || d.SectorSize != ss || len(k.Drives()) != 1 {
				t.Fatalf("drive %+v", d)
			}
			mk := filepath.Join(dir, MasterKeyFile)
			if ok, out := luks2test.Opens(t, img, mk); !ok {
				t.Fatalf("cryptsetup refuses master.key: %s", out)
			}
			vk := luks2test.VolumeKey(t, img, mk)
			// Data at an odd place: crosses sectors, not aligned.
			data := randomBytes(3*ss + 100)
			off := int64(5*ss + 7)
			writeThrough(t, k, img, data, off)
			first := off / int64(ss) * int64(ss)
			n := int((off+int64(len(data))+int64(ss)-1)/int64(ss)*int64(ss) - first)
			plain := python(t, img, vk, first, n, ss, nil)
			if !bytes.Equal(plain[off-first:off-first+int64(len(data))], data) {
				t.Fatal("python3-cryptography does not decrypt what atrest wrote")
			}
			// And the other way: python encrypts, atrest reads.
			theirs := randomBytes(2 * ss)
			python(t, img, vk, int64(9*ss), len(theirs), ss, theirs)
			if got := readThrough(t, k, img, len(theirs), int64(9*ss)); !bytes.Equal(got, theirs) {
				t.Fatal("atrest does not decrypt what python3-cryptography wrote")
			}
			u, err := k.Unlock(img, UnlockOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer u.Device.Close()
			if u.Volume != "vol0" || u.UUID != d.UUID || u.SectorSize != ss || u.Device.Caps().Trim || u.MemberCount != 1 {
				t.Fatalf("unlocked %+v", u)
			}
			if u.Device.Size() != testDriveSize-luks2.DataOffset {
				t.Fatalf("data size %d", u.Device.Size())
			}
		})
	}
}

func TestFormatVolumeNames(t *testing.T) {
	k, _ := newKeystore(t)
	a := luks2test.SparseImage(t, testDriveSize)
	if _, err := k.FormatDrive(a, FormatOptions{Volume: "db", AllowDiscards: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.FormatDrive(luks2test.SparseImage(t, testDriveSize), FormatOptions{Volume: "db"}); !errors.Is(err, ErrVolumeExists) {
		t.Fatalf("taken name: %v", err)
	}
	if _, err := k.FormatDrive(luks2test.SparseImage(t, testDriveSize), FormatOptions{Volume: "../x"}); err == nil {
		t.Fatal("bad name accepted")
	}
	u, err := k.Unlock(a, UnlockOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !u.Device.Caps().Trim || u.Volume != "db" {
		t.Fatalf("%+v", u)
	}
	u.Device.Close()
}

// TestAdopt: drives cryptsetup formatted with a key file, holding data written as
// dm-crypt would (python3-cryptography), join the cluster and keep their data; a
// wrong key file changes nothing.
func TestAdopt(t *testing.T) {
	luks2test.Cryptsetup(t)
	cases := map[string][]string{
		"pbkdf2": luks2test.FastPBKDF2,
		// cryptsetup 2.6's default keyslot as it comes out on this 2-core machine
		// (argon2id, 4 passes over 1 GiB, 2 threads), given explicitly so that
		// luksFormat skips its 2-second benchmark.
		"argon2id default": {"--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "1048576", "--pbkdf-parallel", "2"},
	}
	for name, args := range cases {
		t.Run(name, func(t *testing.T) {
			k, dir := newKeystore(t)
			img := luks2test.SparseImage(t, testDriveSize)
			oldKey := randomBytes(32)
			oldFile := luks2test.KeyFile(t, oldKey)
			vk := randomBytes(64)
			luks2test.Format(t, img, oldFile, append(args, "--sector-size", "512", "--volume-key-file", luks2test.KeyFile(t, vk))...)
			data := randomBytes(8192)
			python(t, img, vk, 4096, len(data), 512, data)

			if strings.HasPrefix(name, "pbkdf2") {
				before := hashFile(t, img)
				_, err := k.AdoptDrive(img, randomBytes(32), AdoptOptions{})
				if !errors.Is(err, luks2.ErrWrongKey) {
					t.Fatalf("wrong key file: %v", err)
				}
				if hashFile(t, img) != before || len(k.Drives()) != 0 {
					t.Fatal("a refused adoption changed something")
				}
			}
			r, err := k.AdoptDrive(img, oldKey, AdoptOptions{Volume: "old"})
			if err != nil {
				t.Fatal(err)
			}
			if r.OldSlot != 0 || len(r.OtherSlots) != 0 || r.Drive.SectorSize != 512 {
				t.Fatalf("%+v", r)
			}
			if got := readThrough(t, k, img, len(data), 4096); !bytes.Equal(got, data) {
				t.Fatal("adopted drive's data changed")
			}
			if ok, _ := luks2test.Opens(t, img, filepath.Join(dir, MasterKeyFile)); !ok {
				t.Fatal("cryptsetup refuses master.key on the adopted drive")
			}
			if ok, _ := luks2test.Opens(t, img, oldFile); ok {
				t.Fatal("the old key file still opens the adopted drive")
			}
			if _, err := k.AdoptDrive(img, oldKey, AdoptOptions{}); !errors.Is(err, ErrRegistered) {
				t.Fatalf("second adoption: %v", err)
			}
		})
	}
}

func TestAdoptKeepOldKeyslot(t *testing.T) {
	luks2test.Cryptsetup(t)
	k, _ := newKeystore(t)
	img := luks2test.SparseImage(t, testDriveSize)
	oldKey := randomBytes(32)
	oldFile := luks2test.KeyFile(t, oldKey)
	luks2test.Format(t, img, oldFile, luks2test.FastPBKDF2...)
	other := luks2test.KeyFile(t, randomBytes(32))
	luks2test.MustRun(t, append([]string{"luksAddKey", "--batch-mode", "--key-file", oldFile, img, other}, luks2test.FastPBKDF2...)...)
	r, err := k.AdoptDrive(img, oldKey, AdoptOptions{KeepOldKeyslot: true})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(r.OtherSlots) != "[0 1]" {
		t.Fatalf("other slots %v", r.OtherSlots)
	}
	if ok, _ := luks2test.Opens(t, img, oldFile); !ok {
		t.Fatal("kept keyslot lost")
	}
}

// formatDrives makes n drives with known data at offset 12345 of each.
func formatDrives(t testing.TB, k *Keystore, n int) (paths []string, data [][]byte) {
	t.Helper()
	for i := range n {
		p := luks2test.SparseImage(t, testDriveSize)
		if _, err := k.FormatDrive(p, FormatOptions{SectorSize: []int{4096, 512}[i%2]}); err != nil {
			t.Fatal(err)
		}
		d := randomBytes(10000)
		writeThrough(t, k, p, d, 12345)
		paths, data = append(paths, p), append(data, d)
	}
	return paths, data
}

// checkRotated: every drive opens with the current master key in atrest and in
// cryptsetup, its data is unchanged, and the old key opens nothing.
func checkRotated(t testing.TB, dir string, paths []string, data [][]byte, oldKey []byte) {
	t.Helper()
	k, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	oldFile := luks2test.KeyFile(t, oldKey)
	for i, p := range paths {
		if got := readThrough(t, k, p, len(data[i]), 12345); !bytes.Equal(got, data[i]) {
			t.Fatalf("drive %d: data changed", i)
		}
		dev := openTestDrive(t, p)
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

func readMaster(t testing.TB, dir string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, MasterKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRotate(t *testing.T) {
	k, dir := newKeystore(t)
	paths, data := formatDrives(t, k, 3)
	oldKey := readMaster(t, dir)
	oldID := k.State().MasterKey.ID
	var steps []string
	// A reader in "another process" unlocks every drive at every step.
	err := k.Rotate(context.Background(), RotateOptions{Step: func(s Step) {
		steps = append(steps, s.Name)
		r, err := Open(dir)
		if err != nil {
			t.Fatalf("at %s: %v", s.Name, err)
		}
		for i, p := range paths {
			if got := readThrough(t, r, p, len(data[i]), 12345); !bytes.Equal(got, data[i]) {
				t.Fatalf("at %s: drive %d reads wrong data", s.Name, i)
			}
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("steps: %v", steps)
	if len(steps) != 2+5*3+4 || steps[len(steps)-1] != StepFinished {
		t.Fatalf("steps %v", steps)
	}
	st := k.State()
	if st.MasterKey.ID == oldID || st.LastRotation == nil || bytes.Equal(readMaster(t, dir), oldKey) {
		t.Fatal("master key not replaced")
	}
	for _, d := range st.Drives {
		if d.KeyID != st.MasterKey.ID || d.State != DriveActive {
			t.Fatalf("registry %+v", d)
		}
	}
	checkRotated(t, dir, paths, data, oldKey)
	status, err := k.Status()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range status.Drives {
		if d.State != StatePresent || d.KeyID != st.MasterKey.ID {
			t.Fatalf("status %+v", d)
		}
	}
}

// TestOpenAcrossRotation: a whole rotation in another process between Open's read of
// keystore.json and its read of master.key leaves a pair that does not match; Open
// reads the state again and opens the keystore as it is after the rotation.
func TestOpenAcrossRotation(t *testing.T) {
	k, dir := newKeystore(t)
	paths, data := formatDrives(t, k, 1)
	oldID := k.State().MasterKey.ID
	rotations := 0
	testHookStateRead = func() {
		if rotations == 0 {
			rotations++
			if err := k.Rotate(context.Background(), RotateOptions{}); err != nil {
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
	if id := r.State().MasterKey.ID; id == oldID || id != k.State().MasterKey.ID {
		t.Fatalf("opened with master key %s; old %s, new %s", id, oldID, k.State().MasterKey.ID)
	}
	if got := readThrough(t, r, paths[0], len(data[0]), 12345); !bytes.Equal(got, data[0]) {
		t.Fatal("drive reads wrong data after the rotation")
	}
}

func TestRotateAbsentDrive(t *testing.T) {
	k, dir := newKeystore(t)
	paths, data := formatDrives(t, k, 3)
	oldKey := readMaster(t, dir)
	pulled := paths[1] + ".pulled"
	os.Rename(paths[1], pulled)
	before := snapshot(t, dir)
	err := k.Rotate(context.Background(), RotateOptions{})
	var me *MissingError
	if !errors.As(err, &me) || !errors.Is(err, ErrDriveMissing) || len(me.Drives) != 1 || !strings.Contains(err.Error(), paths[1]) {
		t.Fatalf("absent drive: %v", err)
	}
	if snapshot(t, dir) != before {
		t.Fatal("a refused rotation changed the keystore")
	}
	if err := k.Rotate(context.Background(), RotateOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	checkRotated(t, dir, []string{paths[0], paths[2]}, [][]byte{data[0], data[2]}, oldKey)
	st, _ := k.Status()
	if st.Drives[1].State != StateOldKey || st.Drives[1].KeyID == k.State().MasterKey.ID {
		t.Fatalf("pulled drive: %+v", st.Drives[1])
	}
	// The pulled drive is locked to the old key for good: the old key opens it,
	// the new one does not, even when it comes back.
	os.Rename(pulled, paths[1])
	if _, err := k.Unlock(paths[1], UnlockOptions{}); !errors.Is(err, luks2.ErrWrongKey) {
		t.Fatalf("new key on the pulled drive: %v", err)
	}
	dev := openTestDrive(t, paths[1])
	defer dev.Close()
	h, _ := luks2.Load(dev)
	if _, _, err := h.Unlock(dev, oldKey); err != nil {
		t.Fatalf("old key on the pulled drive: %v", err)
	}
	// A second rotation leaves it alone.
	if err := k.Rotate(context.Background(), RotateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// errCrash stands for the process dying at a step.
var errCrash = errors.New("crash")

// TestRotateCrashAtEveryStep stops the rotation at every step boundary (a panic
// out of the step callback, the lock then dropped, as a dead process drops it),
// checks that every drive opens with a key the journal names, then reruns.
func TestRotateCrashAtEveryStep(t *testing.T) {
	for stop := 0; ; stop++ {
		k, dir := newKeystore(t)
		paths, data := formatDrives(t, k, 2)
		oldKey := readMaster(t, dir)
		n := 0
		crashed := func() (crashed bool) {
			defer func() {
				if r := recover(); r != nil {
					if r != errCrash {
						panic(r)
					}
					crashed = true
				}
			}()
			err := k.Rotate(context.Background(), RotateOptions{Step: func(s Step) {
				if n == stop {
					panic(errCrash)
				}
				n++
			}})
			if err != nil {
				t.Fatal(err)
			}
			return false
		}()
		k.Close()
		if !crashed {
			t.Logf("crashed at each of %d steps", stop)
			return
		}
		r, err := Open(dir)
		if err != nil {
			t.Fatalf("stop %d: keystore does not open after the crash: %v", stop, err)
		}
		for i, p := range paths {
			if got := readThrough(t, r, p, len(data[i]), 12345); !bytes.Equal(got, data[i]) {
				t.Fatalf("stop %d: drive %d", stop, i)
			}
		}
		k2, err := OpenLocked(dir)
		if err != nil {
			t.Fatal(err)
		}
		if err := k2.Rotate(context.Background(), RotateOptions{}); err != nil {
			t.Fatalf("stop %d: rerun: %v", stop, err)
		}
		k2.Close()
		checkRotated(t, dir, paths, data, oldKey)
	}
}

func TestStatusDuringRotation(t *testing.T) {
	k, dir := newKeystore(t)
	formatDrives(t, k, 2)
	var seen []string
	k.Rotate(context.Background(), RotateOptions{Step: func(s Step) {
		r, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		st, err := r.Status()
		if err != nil {
			t.Fatal(err)
		}
		if s.Name != StepFinished && s.Name != StepNextKeyWritten && (!st.RotationUnderWay || st.Rotation == nil) {
			t.Fatalf("at %s: no rotation reported", s.Name)
		}
		for _, d := range st.Drives {
			if d.State != StatePresent && d.State != StateRotating {
				t.Fatalf("at %s: drive %s", s.Name, d.State)
			}
			seen = append(seen, d.State)
		}
	}})
	if !strings.Contains(strings.Join(seen, " "), StateRotating) {
		t.Fatal("no drive was ever reported rotating")
	}
}

func openTestDrive(t testing.TB, p string) *blockdevFile {
	t.Helper()
	f, err := openDriveReadOnly(p)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

type blockdevFile = blockdev.File

// TestReformatReplacesEntry: formatting (forced by the caller) over a registered
// drive replaces its registry entry instead of leaving a stale one.
func TestReformatReplacesEntry(t *testing.T) {
	k, _ := newKeystore(t)
	img := luks2test.SparseImage(t, testDriveSize)
	d1, err := k.FormatDrive(img, FormatOptions{Volume: "db"})
	if err != nil {
		t.Fatal(err)
	}
	d2, err := k.FormatDrive(img, FormatOptions{SectorSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	if ds := k.Drives(); len(ds) != 1 || ds[0].UUID != d2.UUID || ds[0].UUID == d1.UUID || ds[0].Volume != "db" || ds[0].SectorSize != 512 {
		t.Fatalf("registry %+v", ds)
	}
	if _, err := k.FormatDrive(img, FormatOptions{Volume: "db"}); err != nil {
		t.Fatalf("same name on the replaced drive: %v", err)
	}
}
