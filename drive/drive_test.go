package drive

import (
	"bytes"
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

const (
	testDriveSize = 32 << 20
	testCluster   = "108cfeaf-8048-4dfc-a67c-e3dd42f8650b"
	testVolume    = "823f99d1-9ad6-43f3-ad04-889b24eb5c14"
)

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// newKey makes a master key with a made-up id (the id is the caller's: keystore.KeyID).
func newKey(id string) Key { return Key{ID: id, Key: randomBytes(32)} }

// source is a KeySource that hands out copies of keys (Unlock zeroes what it gets).
func source(keys ...Key) KeySource {
	return func() ([]Key, error) {
		var out []Key
		for _, k := range keys {
			out = append(out, Key{ID: k.ID, Key: bytes.Clone(k.Key)})
		}
		return out, nil
	}
}

// keyFile writes a key to a file for cryptsetup.
func keyFile(t testing.TB, k Key) string { return luks2test.KeyFile(t, k.Key) }

func token(volume string) luks2.AtrestToken {
	return luks2.AtrestToken{ClusterUUID: testCluster, Volume: volume, VolumeUUID: testVolume, MemberCount: 1}
}

func openRW(t testing.TB, path string) *blockdev.File {
	t.Helper()
	dev, err := Open(path, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	return dev
}

// format formats a new sparse image with key.
func format(t testing.TB, key Key, o FormatOptions) (string, *Info) {
	t.Helper()
	img := luks2test.SparseImage(t, testDriveSize)
	o.Key = key
	if o.Token.ClusterUUID == "" {
		o.Token = token("vol0")
	}
	dev := openRW(t, img)
	in, err := Format(dev, img, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	return img, in
}

func unlockOpts(keys ...Key) UnlockOptions {
	return UnlockOptions{ClusterUUID: testCluster, Keys: source(keys...)}
}

// writeThrough writes data through the unlocked drive at off.
func writeThrough(t testing.TB, path string, key Key, data []byte, off int64) {
	t.Helper()
	u, err := Unlock(path, unlockOpts(key))
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

func readThrough(t testing.TB, path string, key Key, n int, off int64) []byte {
	t.Helper()
	o := unlockOpts(key)
	o.ReadOnly = true
	u, err := Unlock(path, o)
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

func hashFile(t testing.TB, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// pythonXTS decrypts n bytes of the data segment at segment offset off (a sector
// multiple) with python3-cryptography, as dm-crypt would: aes-xts-plain64, IV = offset /
// 512 whatever the sector size; or encrypts stdin there.
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

// TestFormatInterop: a drive atrest formats opens in cryptsetup with the master key,
// gives the data key atrest used, and data written through atrest decrypts in
// python3-cryptography (IV in 512-byte units) at both sector sizes.
func TestFormatInterop(t *testing.T) {
	luks2test.Cryptsetup(t)
	for _, ss := range []int{4096, 512} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			key := newKey("mk-0123456789abcdef")
			img, in := format(t, key, FormatOptions{SectorSize: ss})
			if in.SectorSize != ss || in.Token.Volume != "vol0" || in.Token.MasterKeyID != key.ID || in.AllowDiscards {
				t.Fatalf("formatted %+v, token %+v", in, in.Token)
			}
			mk := keyFile(t, key)
			if ok, out := luks2test.Opens(t, img, mk); !ok {
				t.Fatalf("cryptsetup refuses the master key: %s", out)
			}
			vk := luks2test.VolumeKey(t, img, mk)
			// Data at an odd place: crosses sectors, not aligned.
			data := randomBytes(3*ss + 100)
			off := int64(5*ss + 7)
			writeThrough(t, img, key, data, off)
			first := off / int64(ss) * int64(ss)
			n := int((off+int64(len(data))+int64(ss)-1)/int64(ss)*int64(ss) - first)
			plain := python(t, img, vk, first, n, ss, nil)
			if !bytes.Equal(plain[off-first:off-first+int64(len(data))], data) {
				t.Fatal("python3-cryptography does not decrypt what atrest wrote")
			}
			// And the other way: python encrypts, atrest reads.
			theirs := randomBytes(2 * ss)
			python(t, img, vk, int64(9*ss), len(theirs), ss, theirs)
			if got := readThrough(t, img, key, len(theirs), int64(9*ss)); !bytes.Equal(got, theirs) {
				t.Fatal("atrest does not decrypt what python3-cryptography wrote")
			}
			u, err := Unlock(img, unlockOpts(key))
			if err != nil {
				t.Fatal(err)
			}
			defer u.Device.Close()
			if u.Token.Volume != "vol0" || u.UUID != in.UUID || u.SectorSize != ss || u.AllowDiscards || u.Device.Caps().Trim || u.Token.MemberCount != 1 || u.KeyID != key.ID {
				t.Fatalf("unlocked %+v", u)
			}
			if u.Device.Size() != testDriveSize-luks2.DataOffset {
				t.Fatalf("data size %d", u.Device.Size())
			}
		})
	}
}

// TestFormatOptions: the UUID, volume and discard flag asked for are what the header
// says and Unlock reports; a drive of another cluster is foreign.
func TestFormatOptions(t *testing.T) {
	key := newKey("mk-0123456789abcdef")
	const id = "aaaaaaaa-0000-4000-8000-000000000001"
	img, in := format(t, key, FormatOptions{UUID: id, Token: token("db"), AllowDiscards: true})
	if in.UUID != id || !in.AllowDiscards || in.SectorSize != 4096 {
		t.Fatalf("formatted %+v", in)
	}
	u, err := Unlock(img, UnlockOptions{ClusterUUID: testCluster, UUID: id, Keys: source(key)})
	if err != nil {
		t.Fatal(err)
	}
	if !u.AllowDiscards || !u.Device.Caps().Trim || u.Token.Volume != "db" || u.Token.VolumeUUID != testVolume {
		t.Fatalf("unlocked %+v", u)
	}
	u.Device.Close()
	if _, err := Unlock(img, UnlockOptions{ClusterUUID: testCluster, UUID: "bbbbbbbb-0000-4000-8000-000000000002", Keys: source(key)}); !errors.Is(err, ErrMissing) {
		t.Fatalf("unlock expecting another drive: %v", err)
	}
	if _, err := Unlock(img, UnlockOptions{ClusterUUID: "208cfeaf-8048-4dfc-a67c-e3dd42f8650b", Keys: source(key)}); !errors.Is(err, ErrForeign) {
		t.Fatalf("unlock in another cluster: %v", err)
	}
	if _, err := Unlock(img, unlockOpts(newKey("mk-1111111111111111"))); !errors.Is(err, luks2.ErrWrongKey) {
		t.Fatalf("unlock with another key: %v", err)
	}
}

// TestAdopt: drives cryptsetup formatted with a key file, holding data written as
// dm-crypt would (python3-cryptography), join the cluster and keep their data; a wrong
// key file changes nothing.
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
			key := newKey("mk-0123456789abcdef")
			img := luks2test.SparseImage(t, testDriveSize)
			oldKey := randomBytes(32)
			oldFile := luks2test.KeyFile(t, oldKey)
			vk := randomBytes(64)
			luks2test.Format(t, img, oldFile, append(args, "--sector-size", "512", "--volume-key-file", luks2test.KeyFile(t, vk))...)
			data := randomBytes(8192)
			python(t, img, vk, 4096, len(data), 512, data)

			dev := openRW(t, img)
			before, err := Inspect(dev, img)
			if err != nil || before.Token != nil {
				t.Fatalf("inspect before: %+v, %v", before, err)
			}
			if strings.HasPrefix(name, "pbkdf2") {
				sum := hashFile(t, img)
				_, err := Adopt(dev, img, AdoptOptions{OldKey: randomBytes(32), Key: key, Token: token("old")})
				if !errors.Is(err, luks2.ErrWrongKey) {
					t.Fatalf("wrong key file: %v", err)
				}
				if hashFile(t, img) != sum {
					t.Fatal("a refused adoption changed something")
				}
			}
			r, err := Adopt(dev, img, AdoptOptions{OldKey: oldKey, Key: key, Token: token("old")})
			if err != nil {
				t.Fatal(err)
			}
			if r.OldSlot != 0 || len(r.OtherSlots) != 0 || r.SectorSize != 512 || r.UUID != before.UUID {
				t.Fatalf("%+v", r)
			}
			if got := readThrough(t, img, key, len(data), 4096); !bytes.Equal(got, data) {
				t.Fatal("adopted drive's data changed")
			}
			if ok, _ := luks2test.Opens(t, img, keyFile(t, key)); !ok {
				t.Fatal("cryptsetup refuses the master key on the adopted drive")
			}
			if ok, _ := luks2test.Opens(t, img, oldFile); ok {
				t.Fatal("the old key file still opens the adopted drive")
			}
			// What the caller checks before a second adoption: the drive is a member.
			after, err := Inspect(dev, img)
			if err != nil || after.Token == nil || after.Token.ClusterUUID != testCluster || after.Token.Volume != "old" || after.Token.MasterKeyID != key.ID {
				t.Fatalf("inspect after: %+v, %v", after, err)
			}
		})
	}
}

func TestAdoptKeepOldKeyslot(t *testing.T) {
	luks2test.Cryptsetup(t)
	key := newKey("mk-0123456789abcdef")
	img := luks2test.SparseImage(t, testDriveSize)
	oldKey := randomBytes(32)
	oldFile := luks2test.KeyFile(t, oldKey)
	luks2test.Format(t, img, oldFile, luks2test.FastPBKDF2...)
	other := luks2test.KeyFile(t, randomBytes(32))
	luks2test.MustRun(t, append([]string{"luksAddKey", "--batch-mode", "--key-file", oldFile, img, other}, luks2test.FastPBKDF2...)...)
	r, err := Adopt(openRW(t, img), img, AdoptOptions{OldKey: oldKey, Key: key, Token: token("old"), KeepOldKeyslot: true})
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

// TestUnlockRereadsKeys: when no key opens the drive, Unlock asks the KeySource again
// (a rotation in another process may have replaced the key files between the reads)
// and opens with what it gets then; a source that never has the key ends in
// ErrWrongKey after a bounded number of tries.
func TestUnlockRereadsKeys(t *testing.T) {
	key := newKey("mk-0123456789abcdef")
	img, _ := format(t, key, FormatOptions{})
	stale := newKey("mk-1111111111111111")
	calls := 0
	o := unlockOpts()
	o.Keys = func() ([]Key, error) {
		calls++
		if calls == 1 {
			return source(stale)()
		}
		return source(stale, key)()
	}
	u, err := Unlock(img, o)
	if err != nil {
		t.Fatalf("unlock with the key on the second read: %v", err)
	}
	u.Device.Close()
	if calls != 2 || u.KeyID != key.ID {
		t.Fatalf("%d key reads, opened by %s", calls, u.KeyID)
	}
	calls = 0
	o.Keys = func() ([]Key, error) { calls++; return source(stale)() }
	if _, err := Unlock(img, o); !errors.Is(err, luks2.ErrWrongKey) || calls != unlockAttempts {
		t.Fatalf("a source without the key: %v after %d reads", err, calls)
	}
	o.Keys = func() ([]Key, error) { return nil, os.ErrPermission }
	if _, err := Unlock(img, o); !errors.Is(err, os.ErrPermission) {
		t.Fatalf("a failing source: %v", err)
	}
}

// TestUnlockZeroesKeys: the keys a source hands out are zeroed after use.
func TestUnlockZeroesKeys(t *testing.T) {
	key := newKey("mk-0123456789abcdef")
	img, _ := format(t, key, FormatOptions{})
	var given []Key
	o := unlockOpts()
	o.Keys = func() ([]Key, error) {
		keys, _ := source(newKey("mk-1111111111111111"), key)()
		given = append(given, keys...)
		return keys, nil
	}
	u, err := Unlock(img, o)
	if err != nil {
		t.Fatal(err)
	}
	u.Device.Close()
	for _, k := range given {
		if !bytes.Equal(k.Key, make([]byte, len(k.Key))) {
			t.Fatalf("key %s not zeroed", k.ID)
		}
	}
}

// flip flips a bit of a file at off.
func flip(t testing.TB, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x20
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestCheck: each thing that can be wrong with a drive gives its state, and Check says
// present exactly when Unlock succeeds.
func TestCheck(t *testing.T) {
	key := newKey("mk-0123456789abcdef")
	other := newKey("mk-1111111111111111")
	img, in := format(t, key, FormatOptions{})
	o := unlockOpts(key)
	o.UUID = in.UUID
	cases := []struct {
		name  string
		setup func(t *testing.T) (path string, o UnlockOptions)
		state string
		keyID string
		in    string // in the detail
	}{
		{"present", func(t *testing.T) (string, UnlockOptions) { return img, o }, StatePresent, key.ID, ""},
		{"next key opens it", func(t *testing.T) (string, UnlockOptions) {
			o := o
			o.Keys = source(other, key)
			return img, o
		}, StatePresent, key.ID, ""},
		{"no file", func(t *testing.T) (string, UnlockOptions) { return img + ".gone", o }, StateMissing, "", "no such file"},
		{"not LUKS", func(t *testing.T) (string, UnlockOptions) { return luks2test.SparseImage(t, testDriveSize), o }, StateMissing, "", "no LUKS2 header"},
		{"another drive", func(t *testing.T) (string, UnlockOptions) {
			p, _ := format(t, key, FormatOptions{})
			return p, o
		}, StateMissing, "", "holds drive"},
		{"another cluster", func(t *testing.T) (string, UnlockOptions) {
			o := o
			o.ClusterUUID = "208cfeaf-8048-4dfc-a67c-e3dd42f8650b"
			return img, o
		}, StateForeign, "", "not a member"},
		{"wrong key", func(t *testing.T) (string, UnlockOptions) {
			o := o
			o.Keys = source(other)
			return img, o
		}, StateWrongKey, key.ID, "does not open"},
		{"one copy damaged", func(t *testing.T) (string, UnlockOptions) {
			p := copyFile(t, img)
			flip(t, p, luks2.HeaderSize+4096+2) // the secondary's JSON
			return p, o
		}, StateDegraded, key.ID, "secondary header damaged"},
		{"both copies damaged", func(t *testing.T) (string, UnlockOptions) {
			p := copyFile(t, img)
			flip(t, p, 4096+2)
			flip(t, p, luks2.HeaderSize+4096+2)
			return p, o
		}, StateDamaged, "", "damaged"},
		// The header loads and the key opens it, but the data segment starts past the
		// end of the drive: Unlock refuses it, so Check must not say present.
		{"segment past the end", func(t *testing.T) (string, UnlockOptions) {
			p := copyFile(t, img)
			if err := os.Truncate(p, luks2.DataOffset); err != nil {
				t.Fatal(err)
			}
			return p, o
		}, StateDamaged, key.ID, "region"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path, o := c.setup(t)
			h, err := Check(path, o)
			if err != nil {
				t.Fatal(err)
			}
			if h.State != c.state || h.KeyID != c.keyID || !strings.Contains(h.Detail, c.in) {
				t.Fatalf("got %+v, want state %s, key %q, detail with %q", h, c.state, c.keyID, c.in)
			}
			u, uerr := Unlock(path, o)
			if uerr == nil {
				u.Device.Close()
			}
			if present := h.State == StatePresent || h.State == StateDegraded; present != (uerr == nil) {
				t.Fatalf("Check says %s, Unlock says %v", h.State, uerr)
			}
		})
	}
	o.Keys = func() ([]Key, error) { return nil, os.ErrPermission }
	if _, err := Check(img, o); !errors.Is(err, os.ErrPermission) {
		t.Fatalf("a failing key source: %v", err)
	}
}

func copyFile(t testing.TB, from string) string {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	to := filepath.Join(t.TempDir(), "copy.img")
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return to
}

// TestProbe: the drive at its path, and each way of not being there.
func TestProbe(t *testing.T) {
	key := newKey("mk-0123456789abcdef")
	img, in := format(t, key, FormatOptions{})
	if err := Probe(img, in.UUID); err != nil {
		t.Fatal(err)
	}
	for name, path := range map[string]string{"gone": img + ".gone", "not LUKS": luks2test.SparseImage(t, 1<<20)} {
		if err := Probe(path, in.UUID); !errors.Is(err, ErrMissing) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if err := Probe(img, "bbbbbbbb-0000-4000-8000-000000000002"); !errors.Is(err, ErrMissing) || !strings.Contains(err.Error(), in.UUID) {
		t.Errorf("another drive: %v", err)
	}
	p := copyFile(t, img)
	flip(t, p, 4096+2)
	flip(t, p, luks2.HeaderSize+4096+2)
	if err := Probe(p, in.UUID); errors.Is(err, ErrMissing) || !errors.Is(err, luks2.ErrDamaged) {
		t.Errorf("damaged header: %v", err)
	}
}
