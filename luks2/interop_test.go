package luks2

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2/luks2test"
)

func openFile(t testing.TB, path string) *blockdev.File {
	t.Helper()
	f, err := blockdev.OpenFile(path, blockdev.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestCryptsetupAcceptsAtrestHeaders: what atrest writes, cryptsetup accepts, at both
// sector sizes, after every kind of change.
func TestCryptsetupAcceptsAtrestHeaders(t *testing.T) {
	luks2test.Cryptsetup(t)
	for _, ss := range []int{4096, 512} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			img := luks2test.SparseImage(t, 32<<20)
			dev := openFile(t, img)
			vk, pass := newKey(t, KeySize), newKey(t, 32)
			h, err := Format(dev, FormatOptions{VolumeKey: vk, Passphrase: pass, SectorSize: ss, AllowDiscards: true,
				Token: &AtrestToken{ClusterUUID: "11111111-2222-3333-4444-555555555555", Volume: "vol0", VolumeUUID: "v", MemberCount: 1, MasterKeyID: "mk-1"}})
			if err != nil {
				t.Fatal(err)
			}
			keyFile := luks2test.KeyFile(t, pass)
			dump := luks2test.MustRun(t, "luksDump", img)
			for _, want := range []string{"Version:       \t2", "UUID:          \t" + h.UUID(), fmt.Sprintf("sector: %d [bytes]", ss),
				"offset: 16777216 [bytes]", "cipher: aes-xts-plain64", "PBKDF:      pbkdf2", "Iterations: 1000", "AF stripes: 4000",
				"Flags:       \tallow-discards", "atrest", "Keyslot:    0"} {
				if !strings.Contains(dump, want) {
					t.Errorf("luksDump lacks %q:\n%s", want, dump)
				}
			}
			if ok, out := luks2test.Opens(t, img, keyFile); !ok {
				t.Fatalf("cryptsetup refuses the key file: %s", out)
			}
			if got := luks2test.VolumeKey(t, img, keyFile); !bytes.Equal(got, vk) {
				t.Fatal("cryptsetup's volume key differs from atrest's")
			}
			// Rotate the wrapping as atrest does; cryptsetup follows.
			pass2 := newKey(t, 32)
			slot, err := h.AddKeyslot(dev, vk, pass2)
			if err != nil {
				t.Fatal(err)
			}
			if err := h.WipeKeyslot(dev, 0); err != nil {
				t.Fatal(err)
			}
			tok, _ := h.AtrestToken()
			tok.Keyslots, tok.MasterKeyID = []int{slot}, "mk-2"
			if err := h.SetAtrestToken(dev, tok); err != nil {
				t.Fatal(err)
			}
			if ok, _ := luks2test.Opens(t, img, keyFile); ok {
				t.Fatal("cryptsetup still opens with the wiped keyslot's key")
			}
			k2 := luks2test.KeyFile(t, pass2)
			if ok, out := luks2test.Opens(t, img, k2); !ok {
				t.Fatalf("cryptsetup refuses the new key: %s", out)
			}
			if got := luks2test.VolumeKey(t, img, k2); !bytes.Equal(got, vk) {
				t.Fatal("volume key changed")
			}
			// cryptsetup writes our header (luksAddKey) and atrest still reads it,
			// token and all.
			k3 := luks2test.KeyFile(t, newKey(t, 32))
			luks2test.MustRun(t, append([]string{"luksAddKey", "--batch-mode", "--key-file", k2, img, k3}, luks2test.FastPBKDF2...)...)
			h3, err := Load(dev)
			if err != nil {
				t.Fatal(err)
			}
			if tok3, err := h3.AtrestToken(); err != nil || tok3.MasterKeyID != "mk-2" {
				t.Fatalf("token after cryptsetup wrote the header: %+v %v", tok3, err)
			}
			if got, _, err := h3.Unlock(dev, newKeyFrom(t, k3)); err != nil || !bytes.Equal(got, vk) {
				t.Fatalf("cryptsetup's new keyslot: %v", err)
			}
		})
	}
}

// TestAtrestOpensCryptsetupHeaders: what cryptsetup formats with a key file, atrest
// opens, adds a keyslot to, and cryptsetup opens with that keyslot.
func TestAtrestOpensCryptsetupHeaders(t *testing.T) {
	luks2test.Cryptsetup(t)
	cases := map[string][]string{
		"pbkdf2":     luks2test.FastPBKDF2,
		"pbkdf2 512": append([]string{"--sector-size", "512"}, luks2test.FastPBKDF2...),
		// Argon2id keyslots (cryptsetup's default) are tested through adoption in
		// keystore's TestAdopt, once: each costs seconds.
	}
	for name, args := range cases {
		t.Run(name, func(t *testing.T) {
			img := luks2test.SparseImage(t, 32<<20)
			old := newKey(t, 32)
			oldFile := luks2test.KeyFile(t, old)
			want := newKey(t, KeySize)
			luks2test.Format(t, img, oldFile, append(args, "--volume-key-file", luks2test.KeyFile(t, want))...)
			dev := openFile(t, img)
			h, err := Load(dev)
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			vk, slot, err := h.Unlock(dev, old)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: unlocked keyslot %d in %v", name, slot, time.Since(start))
			if !bytes.Equal(vk, want) {
				t.Fatal("atrest's volume key differs from cryptsetup's")
			}
			if _, _, err := h.Unlock(dev, newKey(t, 32)); !errors.Is(err, ErrWrongKey) {
				t.Fatalf("wrong key: %v", err)
			}
			pass := newKey(t, 32)
			if _, err := h.AddKeyslot(dev, vk, pass); err != nil {
				t.Fatal(err)
			}
			if ok, out := luks2test.Opens(t, img, luks2test.KeyFile(t, pass)); !ok {
				t.Fatalf("cryptsetup refuses atrest's keyslot in its header: %s", out)
			}
			if h2, err := Load(dev); err != nil || len(h2.Keyslots()) != 2 {
				t.Fatalf("the old keyslot was lost: %v", err)
			}
		})
	}
}

// TestCryptsetupRepairsAndAtrestReads: a header cryptsetup repaired after atrest
// damaged one copy, and atrest's repair of one cryptsetup accepts.
func TestRepairInterop(t *testing.T) {
	luks2test.Cryptsetup(t)
	img := luks2test.SparseImage(t, 32<<20)
	dev := openFile(t, img)
	vk, pass := newKey(t, KeySize), newKey(t, 32)
	if _, err := Format(dev, FormatOptions{VolumeKey: vk, Passphrase: pass}); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	dev.ReadAt(b, binHeaderSize+10)
	b[0] ^= 1
	dev.WriteAt(b, binHeaderSize+10)
	h, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Repair(dev); err != nil {
		t.Fatal(err)
	}
	out := luks2test.MustRun(t, "luksDump", "--debug", img)
	if strings.Contains(out, "checksum error") || strings.Contains(out, "Repairing") {
		t.Fatalf("cryptsetup still sees damage after atrest's repair:\n%s", out)
	}
	if ok, out := luks2test.Opens(t, img, luks2test.KeyFile(t, pass)); !ok {
		t.Fatal(out)
	}
}

func newKeyFrom(t testing.TB, path string) []byte {
	t.Helper()
	b, err := readFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestLargerMetadataArea: cryptsetup headers with a 64 KiB header copy load, also
// with the primary gone (the secondary is found at 64 KiB), and take atrest keyslots.
func TestLargerMetadataArea(t *testing.T) {
	luks2test.Cryptsetup(t)
	img := luks2test.SparseImage(t, 32<<20)
	key := newKey(t, 32)
	kf := luks2test.KeyFile(t, key)
	luks2test.Format(t, img, kf, append([]string{"--luks2-metadata-size", "64k", "--luks2-keyslots-size", "4m"}, luks2test.FastPBKDF2...)...)
	dev := openFile(t, img)
	dev.WriteAt(make([]byte, binHeaderSize), 0)
	h, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if h.HeaderSize() != 65536 {
		t.Fatalf("header size %d", h.HeaderSize())
	}
	if err := h.Repair(dev); err != nil {
		t.Fatal(err)
	}
	vk, _, err := h.Unlock(dev, key)
	if err != nil {
		t.Fatal(err)
	}
	p2 := newKey(t, 32)
	if _, err := h.AddKeyslot(dev, vk, p2); err != nil {
		t.Fatal(err)
	}
	if ok, out := luks2test.Opens(t, img, luks2test.KeyFile(t, p2)); !ok {
		t.Fatal(out)
	}
	if ok, out := luks2test.Opens(t, img, kf); !ok {
		t.Fatal(out)
	}
}
