package luks2

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
)

const testDevSize = DataOffset + 1<<20

func newKey(t testing.TB, n int) []byte {
	t.Helper()
	k := make([]byte, n)
	rand.Read(k)
	return k
}

// formatMem formats a memory device and returns it with the volume key and passphrase.
func formatMem(t testing.TB, sectorSize int) (*blockdev.Mem, *Header, []byte, []byte) {
	t.Helper()
	dev := blockdev.NewMem(testDevSize)
	vk, pass := newKey(t, KeySize), newKey(t, 32)
	h, err := Format(dev, FormatOptions{VolumeKey: vk, Passphrase: pass, SectorSize: sectorSize})
	if err != nil {
		t.Fatal(err)
	}
	return dev, h, vk, pass
}

func memBytes(t testing.TB, dev *blockdev.Mem, off, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := dev.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFormatLoadUnlock(t *testing.T) {
	for _, ss := range []int{4096, 512} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			dev, h, vk, pass := formatMem(t, ss)
			h2, err := Load(dev)
			if err != nil {
				t.Fatal(err)
			}
			if bad, err := h2.NeedsRepair(); bad {
				t.Fatalf("fresh header needs repair: %v", err)
			}
			if h2.UUID() != h.UUID() || h2.Seqid() != h.Seqid() {
				t.Fatalf("loaded %s/%d, wrote %s/%d", h2.UUID(), h2.Seqid(), h.UUID(), h.Seqid())
			}
			s := h2.Segment()
			if s.Offset != DataOffset || s.Size != -1 || s.SectorSize != ss || s.IVTweak != 0 || s.Encryption != DataCipher {
				t.Fatalf("segment %+v", s)
			}
			got, slot, err := h2.Unlock(dev, pass)
			if err != nil {
				t.Fatal(err)
			}
			if slot != 0 || !bytes.Equal(got, vk) {
				t.Fatalf("slot %d, key matches %v", slot, bytes.Equal(got, vk))
			}
			if _, _, err := h2.Unlock(dev, newKey(t, 32)); !errors.Is(err, ErrWrongKey) {
				t.Fatalf("wrong passphrase: %v", err)
			}
			// Both copies carry different salts and the right magic.
			p, s2 := memBytes(t, dev, 0, HeaderSize), memBytes(t, dev, HeaderSize, HeaderSize)
			if !bytes.Equal(p[:6], magicPrimary) || !bytes.Equal(s2[:6], magicSecondary) {
				t.Fatalf("magics %q %q", p[:6], s2[:6])
			}
			if bytes.Equal(p[offSalt:offSalt+saltLen], s2[offSalt:offSalt+saltLen]) {
				t.Fatal("both copies have the same salt")
			}
			if !strings.Contains(string(h2.JSON()), `"tokens":{}`) {
				t.Fatalf("tokens missing from %s", h2.JSON())
			}
		})
	}
}

func TestFormatRefuses(t *testing.T) {
	vk, pass := newKey(t, KeySize), newKey(t, 32)
	weak := bytes.Repeat([]byte{7}, KeySize)
	for name, o := range map[string]FormatOptions{
		"short key":   {VolumeKey: vk[:32], Passphrase: pass},
		"weak key":    {VolumeKey: weak, Passphrase: pass},
		"sector 1024": {VolumeKey: vk, Passphrase: pass, SectorSize: 1024},
		"bad uuid":    {VolumeKey: vk, Passphrase: pass, UUID: "nope"},
	} {
		if _, err := Format(blockdev.NewMem(testDevSize), o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := Format(blockdev.NewMem(DataOffset), FormatOptions{VolumeKey: vk, Passphrase: pass}); err == nil {
		t.Error("too small a device: accepted")
	}
}

func TestAddWipeKeyslotAndToken(t *testing.T) {
	dev, h, vk, pass := formatMem(t, 4096)
	tok := &AtrestToken{Keyslots: []int{0}, ClusterUUID: "c", Volume: "v", VolumeUUID: "vu", MemberIndex: 0, MemberCount: 1, MasterKeyID: "old"}
	if err := h.SetAtrestToken(dev, tok); err != nil {
		t.Fatal(err)
	}
	pass2 := newKey(t, 32)
	slot, err := h.AddKeyslot(dev, vk, pass2)
	if err != nil {
		t.Fatal(err)
	}
	if slot != 1 {
		t.Fatalf("new slot %d", slot)
	}
	if ks := h.Keyslots(); ks[1].Area.Offset != 2*HeaderSize+KeyslotAreaSize {
		t.Fatalf("slot 1 area at %d", ks[1].Area.Offset)
	}
	if _, err := h.AddKeyslot(dev, newKey(t, KeySize), pass2); err == nil {
		t.Fatal("a key that does not match the digest was accepted")
	}
	area := h.Keyslots()[0].Area
	before := memBytes(t, dev, area.Offset, area.Size)
	if err := h.WipeKeyslot(dev, 0); err != nil {
		t.Fatal(err)
	}
	after := memBytes(t, dev, area.Offset, area.Size)
	if bytes.Equal(before, after) || bytes.Count(after, []byte{0}) > len(after)/100 {
		t.Fatal("area not overwritten with random bytes")
	}
	h2, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if len(h2.Keyslots()) != 1 {
		t.Fatalf("keyslots after wipe: %d", len(h2.Keyslots()))
	}
	if _, _, err := h2.Unlock(dev, pass); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("old passphrase after wipe: %v", err)
	}
	if k, s, err := h2.Unlock(dev, pass2); err != nil || s != 1 || !bytes.Equal(k, vk) {
		t.Fatalf("new passphrase: slot %d err %v", s, err)
	}
	got, err := h2.AtrestToken()
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Keyslots) != 0 || got.MasterKeyID != "old" {
		t.Fatalf("token after wipe: %+v", got)
	}
	got.Keyslots, got.MasterKeyID = []int{1}, "new"
	if err := h2.SetAtrestToken(dev, got); err != nil {
		t.Fatal(err)
	}
	if got2, _ := h2.AtrestToken(); got2.MasterKeyID != "new" || got2.Keyslots[0] != 1 {
		t.Fatalf("token %+v", got2)
	}
	got.Keyslots = []int{5}
	if err := h2.SetAtrestToken(dev, got); err == nil {
		t.Fatal("a token naming a missing keyslot was accepted")
	}
	// The next slot reuses the freed id 0 and the freed area.
	s3, err := h2.AddKeyslot(dev, vk, pass)
	if err != nil || s3 != 0 || h2.Keyslots()[0].Area.Offset != area.Offset {
		t.Fatalf("slot %d err %v", s3, err)
	}
}

func TestKeyslotsRunOut(t *testing.T) {
	dev, h, vk, _ := formatMem(t, 4096)
	pass := newKey(t, 32)
	var err error
	for i := 1; i < 40 && err == nil; i++ {
		_, err = h.AddKeyslot(dev, vk, pass)
	}
	if !errors.Is(err, ErrNoSpace) || len(h.Keyslots()) != maxKeyslots {
		t.Fatalf("after %d slots: %v", len(h.Keyslots()), err)
	}
}

// corrupt flips a byte of the JSON area of copy i.
func corrupt(t testing.TB, dev *blockdev.Mem, i int) {
	off := int64(i)*HeaderSize + binHeaderSize + 3
	b := memBytes(t, dev, off, 1)
	b[0] ^= 0x40
	if _, err := dev.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestRepairOneCopy(t *testing.T) {
	for i, name := range []string{"primary", "secondary"} {
		t.Run(name, func(t *testing.T) {
			dev, _, vk, pass := formatMem(t, 4096)
			good := memBytes(t, dev, int64(1-i)*HeaderSize, HeaderSize)
			corrupt(t, dev, i)
			h, err := Load(dev)
			if err != nil {
				t.Fatal(err)
			}
			bad, why := h.NeedsRepair()
			if !bad || !strings.Contains(why.Error(), name+" header damaged") {
				t.Fatalf("needs repair %v: %v", bad, why)
			}
			if k, _, err := h.Unlock(dev, pass); err != nil || !bytes.Equal(k, vk) {
				t.Fatalf("unlock with one damaged copy: %v", err)
			}
			if err := h.Repair(dev); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(memBytes(t, dev, int64(1-i)*HeaderSize, HeaderSize), good) {
				t.Fatal("repair changed the good copy")
			}
			h2, err := Load(dev)
			if err != nil {
				t.Fatal(err)
			}
			if bad, why := h2.NeedsRepair(); bad {
				t.Fatalf("still needs repair: %v", why)
			}
			rep := memBytes(t, dev, int64(i)*HeaderSize, HeaderSize)
			if bytes.Equal(rep[offSalt:offSalt+saltLen], good[offSalt:offSalt+saltLen]) {
				t.Fatal("repaired copy reuses the other copy's salt")
			}
		})
	}
}

func TestStaleCopy(t *testing.T) {
	dev, h, vk, _ := formatMem(t, 4096)
	oldSecondary := memBytes(t, dev, HeaderSize, HeaderSize)
	if _, err := h.AddKeyslot(dev, vk, newKey(t, 32)); err != nil {
		t.Fatal(err)
	}
	// As if the crash came after the primary was written: the secondary is older.
	dev.WriteAt(oldSecondary, HeaderSize)
	h2, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if bad, why := h2.NeedsRepair(); !bad || !strings.Contains(why.Error(), "stale") {
		t.Fatalf("stale secondary not noticed: %v", why)
	}
	if len(h2.Keyslots()) != 2 || h2.Seqid() != h.Seqid() {
		t.Fatal("the older copy won")
	}
	// And the other way round: the newer secondary wins over an older primary.
	dev2, h3, vk3, _ := formatMem(t, 4096)
	oldPrimary := memBytes(t, dev2, 0, HeaderSize)
	h3.AddKeyslot(dev2, vk3, newKey(t, 32))
	dev2.WriteAt(oldPrimary, 0)
	h4, err := Load(dev2)
	if err != nil || len(h4.Keyslots()) != 2 {
		t.Fatalf("newer secondary lost: %v", err)
	}
}

func TestBothCopiesDamagedWritesNothing(t *testing.T) {
	dev, _, _, _ := formatMem(t, 4096)
	corrupt(t, dev, 0)
	corrupt(t, dev, 1)
	before := memBytes(t, dev, 0, testDevSize)
	_, err := Load(dev)
	if !errors.Is(err, ErrDamaged) {
		t.Fatalf("want ErrDamaged, got %v", err)
	}
	if !strings.Contains(err.Error(), "primary:") || !strings.Contains(err.Error(), "secondary:") {
		t.Fatalf("error does not say what is wrong with each copy: %v", err)
	}
	if !bytes.Equal(before, memBytes(t, dev, 0, testDevSize)) {
		t.Fatal("Load changed the device")
	}
}

func TestNotLUKS(t *testing.T) {
	if _, err := Load(blockdev.NewMem(testDevSize)); !errors.Is(err, ErrNotLUKS) {
		t.Fatalf("zeroes: %v", err)
	}
	dev, _, _, _ := formatMem(t, 4096)
	dev.WriteAt([]byte{0, 1}, offVersion) // LUKS1
	dev.WriteAt(make([]byte, HeaderSize), HeaderSize)
	if _, err := Load(dev); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("version 1: %v", err)
	}
}

// rewrite edits the metadata of a formatted header and writes it back with a valid
// checksum in both copies, as a crafted header would be.
func rewrite(t testing.TB, dev *blockdev.Mem, edit func(root object)) {
	t.Helper()
	for i := range 2 {
		off := int64(i) * HeaderSize
		area := memBytes(t, dev, off, HeaderSize)
		text, err := jsonText(area)
		if err != nil {
			t.Fatal(err)
		}
		root, err := decodeJSON(text)
		if err != nil {
			t.Fatal(err)
		}
		edit(root)
		nt := encodeJSON(root)
		clear(area[binHeaderSize:])
		copy(area[binHeaderSize:], nt)
		setChecksum(area)
		dev.WriteAt(area, off)
	}
}

func slot0(root object) object { return root["keyslots"].(object)["0"].(object) }

func TestAllowListBeforeDerivation(t *testing.T) {
	cases := map[string]struct {
		edit func(object)
		want string
	}{
		"pbkdf2 iterations": {func(r object) { slot0(r)["kdf"].(object)["iterations"] = jsonInt(2000000000) }, "iterations 2000000000"},
		"pbkdf2 too few":    {func(r object) { slot0(r)["kdf"].(object)["iterations"] = jsonInt(999) }, "iterations 999"},
		"pbkdf2 sha1":       {func(r object) { slot0(r)["kdf"].(object)["hash"] = "sha1" }, `hash "sha1"`},
		"argon2 memory": {func(r object) {
			slot0(r)["kdf"] = object{"type": "argon2id", "time": jsonInt(4), "memory": jsonInt(1 << 30), "cpus": jsonInt(4), "salt": "AAAA"}
		}, "memory cost"},
		"argon2 time": {func(r object) {
			slot0(r)["kdf"] = object{"type": "argon2id", "time": jsonInt(1 << 30), "memory": jsonInt(1 << 20), "cpus": jsonInt(4), "salt": "AAAA"}
		}, "time cost"},
		"argon2 work": {func(r object) {
			slot0(r)["kdf"] = object{"type": "argon2i", "time": jsonInt(32), "memory": jsonInt(4 << 20), "cpus": jsonInt(4), "salt": "AAAA"}
		}, "exceeds the limit"},
		"argon2 cpus": {func(r object) {
			slot0(r)["kdf"] = object{"type": "argon2id", "time": jsonInt(4), "memory": jsonInt(1 << 20), "cpus": jsonInt(255), "salt": "AAAA"}
		}, "parallel cost"},
		"unknown kdf": {func(r object) { slot0(r)["kdf"].(object)["type"] = "scrypt" }, `kdf type "scrypt"`},
		"stripes":     {func(r object) { slot0(r)["af"].(object)["stripes"] = jsonInt(1 << 30) }, "stripes"},
		"one stripe":  {func(r object) { slot0(r)["af"].(object)["stripes"] = jsonInt(1) }, "with 1 stripes"},
		"small area":  {func(r object) { slot0(r)["area"].(object)["size"] = "4096" }, "area of 4096 bytes"},
		"area cipher": {func(r object) { slot0(r)["area"].(object)["encryption"] = "serpent-xts-plain64" }, "area cipher"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			dev, _, _, pass := formatMem(t, 4096)
			rewrite(t, dev, c.edit)
			h, err := Load(dev)
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			_, _, err = h.Unlock(dev, pass)
			// Refused before derivation: no KDF ran (a millisecond budget would be a
			// timing assertion; the error is the proof, the time is logged). The only
			// slot was refused, so nothing is known about the key: not ErrWrongKey.
			t.Logf("refused in %v", time.Since(start))
			if !errors.Is(err, ErrUnsupported) || errors.Is(err, ErrWrongKey) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrUnsupported naming %q", err, c.want)
			}
		})
	}
}

// TestAllowListNoDerivation proves that no derivation ran for a refused slot: the
// derive function must not be reached.
func TestAllowListNoDerivation(t *testing.T) {
	dev, _, _, pass := formatMem(t, 4096)
	rewrite(t, dev, func(r object) { slot0(r)["kdf"].(object)["iterations"] = jsonInt(1<<31 - 1) })
	h, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	derived := 0
	old := deriveHook
	deriveHook = func() { derived++ }
	defer func() { deriveHook = old }()
	if _, _, err := h.Unlock(dev, pass); err == nil {
		t.Fatal("absurd header opened")
	}
	if derived != 0 {
		t.Fatalf("%d derivations ran for a refused keyslot", derived)
	}
}

func TestProfileRefusals(t *testing.T) {
	cases := map[string]struct {
		edit func(object)
		want string
	}{
		"reencrypt requirement": {func(r object) {
			r["config"].(object)["requirements"] = object{"mandatory": []any{"online-reencrypt-v2"}}
		}, "online-reencrypt-v2"},
		"cipher": {func(r object) { r["segments"].(object)["0"].(object)["encryption"] = "aes-cbc-essiv:sha256" }, "data cipher"},
		"integrity": {func(r object) {
			r["segments"].(object)["0"].(object)["integrity"] = object{"type": "hmac(sha256)"}
		}, "integrity"},
		"digest iterations": {func(r object) { r["digests"].(object)["0"].(object)["iterations"] = jsonInt(1 << 30) }, "digest iterations"},
		"key size":          {func(r object) { slot0(r)["key_size"] = jsonInt(32) }, "volume key"},
		"two segments": {func(r object) {
			s := r["segments"].(object)
			s["0"].(object)["size"] = "1048576"
			s["1"] = object{"type": "linear", "offset": fmt.Sprint(DataOffset + 1<<20), "size": "dynamic"}
		}, "2 segments"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			dev, _, _, _ := formatMem(t, 4096)
			rewrite(t, dev, c.edit)
			_, err := Load(dev)
			if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrUnsupported naming %q", err, c.want)
			}
		})
	}
}

func TestStructuralRules(t *testing.T) {
	cases := map[string]func(object){
		"no tokens":         func(r object) { delete(r, "tokens") },
		"json_size":         func(r object) { r["config"].(object)["json_size"] = "4096" },
		"keyslots_size":     func(r object) { r["config"].(object)["keyslots_size"] = "1000" },
		"area outside":      func(r object) { slot0(r)["area"].(object)["offset"] = "0" },
		"number as number":  func(r object) { slot0(r)["area"].(object)["offset"] = jsonInt(32768) },
		"leading zero":      func(r object) { slot0(r)["area"].(object)["offset"] = "032768" },
		"bad name":          func(r object) { k := r["keyslots"].(object); k["x"] = k["0"]; delete(k, "0") },
		"digest to nowhere": func(r object) { r["digests"].(object)["0"].(object)["keyslots"] = []any{"7"} },
		"segment in header": func(r object) { r["segments"].(object)["0"].(object)["offset"] = "4096" },
		"sector size":       func(r object) { r["segments"].(object)["0"].(object)["sector_size"] = jsonInt(300) },
		"bad base64":        func(r object) { slot0(r)["kdf"].(object)["salt"] = "!!" },
		"token to nowhere":  func(r object) { r["tokens"].(object)["0"] = object{"type": "x", "keyslots": []any{"3"}} },
		"overlapping areas": func(r object) { r["keyslots"].(object)["1"] = cloneTree(slot0(r)) },
	}
	for name, edit := range cases {
		t.Run(name, func(t *testing.T) {
			dev, _, _, _ := formatMem(t, 4096)
			rewrite(t, dev, edit)
			_, err := Load(dev)
			if !errors.Is(err, ErrDamaged) {
				t.Fatalf("want both copies refused as damaged, got %v", err)
			}
		})
	}
}

func TestUnknownFieldsSurvive(t *testing.T) {
	dev, _, vk, _ := formatMem(t, 4096)
	rewrite(t, dev, func(r object) {
		r["config"].(object)["x-vendor"] = "keep me"
		r["tokens"].(object)["3"] = object{"type": "systemd-fido2", "keyslots": []any{"0"}, "fido2-credential": "abc"}
	})
	h, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.AddKeyslot(dev, vk, newKey(t, 32)); err != nil {
		t.Fatal(err)
	}
	if err := h.WipeKeyslot(dev, 0); err != nil {
		t.Fatal(err)
	}
	j := string(h.JSON())
	if !strings.Contains(j, `"x-vendor":"keep me"`) || !strings.Contains(j, `"fido2-credential":"abc"`) {
		t.Fatalf("unknown fields lost: %s", j)
	}
}

// crashDev passes writes to a Mem until the budget of bytes runs out; the write that
// crosses it lands partly (a torn write), and every later write fails.
type crashDev struct {
	*blockdev.Mem
	budget int64
}

var errCrashed = errors.New("crashed")

func (c *crashDev) WriteAt(p []byte, off int64) (int, error) {
	if c.budget <= 0 {
		return 0, errCrashed
	}
	if int64(len(p)) > c.budget {
		n, _ := c.Mem.WriteAt(p[:c.budget], off)
		c.budget = 0
		return n, errCrashed
	}
	c.budget -= int64(len(p))
	return c.Mem.WriteAt(p, off)
}

func (c *crashDev) WriteZeroes(off, n int64, f blockdev.ZeroFlags) error {
	return blockdev.WriteZeroBuffers(c, off, n)
}

// TestCrashAtEveryWrite cuts a keyslot change at every 4 KiB of its writes and
// checks that what is on the device opens, with the old or the new key, never with
// neither, and that the header loads.
func TestCrashAtEveryWrite(t *testing.T) {
	base, h0, vk, oldPass := formatMem(t, 4096)
	h0.SetAtrestToken(base, &AtrestToken{Keyslots: []int{0}, ClusterUUID: "c", Volume: "v", VolumeUUID: "u", MemberCount: 1, MasterKeyID: "old"})
	// The change touches only the first MiB (headers, keyslots 0 and 1): the crash
	// devices hold just that.
	const crashDevSize = 1 << 20
	image := memBytes(t, base, 0, crashDevSize)
	newPass := newKey(t, 32)
	// One rotation of the drive's wrapping: add, retoken, wipe.
	rotate := func(dev Device) error {
		h, err := Load(dev)
		if err != nil {
			return err
		}
		s, err := h.AddKeyslot(dev, vk, newPass)
		if err != nil {
			return err
		}
		if err := h.WipeKeyslot(dev, 0); err != nil {
			return err
		}
		return h.SetAtrestToken(dev, &AtrestToken{Keyslots: []int{s}, ClusterUUID: "c", Volume: "v", VolumeUUID: "u", MemberCount: 1, MasterKeyID: "new"})
	}
	// Total bytes written by a full run.
	full := &crashDev{Mem: blockdev.NewMem(crashDevSize), budget: 1 << 40}
	full.Mem.WriteAt(image, 0)
	if err := rotate(full); err != nil {
		t.Fatal(err)
	}
	total := 1<<40 - full.budget
	step := int64(4096)
	checked := 0
	for b := int64(0); b < total; b += step {
		dev := &crashDev{Mem: blockdev.NewMem(crashDevSize), budget: b}
		dev.Mem.WriteAt(image, 0)
		if err := rotate(dev); !errors.Is(err, errCrashed) {
			t.Fatalf("budget %d: %v", b, err)
		}
		h, err := Load(dev.Mem)
		if err != nil {
			t.Fatalf("budget %d: header does not load after the crash: %v", b, err)
		}
		kOld, _, errOld := h.Unlock(dev.Mem, oldPass)
		kNew, _, errNew := h.Unlock(dev.Mem, newPass)
		if errOld != nil && errNew != nil {
			t.Fatalf("budget %d: neither key opens (old: %v; new: %v)", b, errOld, errNew)
		}
		for _, k := range [][]byte{kOld, kNew} {
			if k != nil && !bytes.Equal(k, vk) {
				t.Fatalf("budget %d: wrong volume key", b)
			}
		}
		checked++
	}
	t.Logf("%d crash points over %d bytes of writes", checked, total)
}

func TestBinaryFields(t *testing.T) {
	dev, h, _, _ := formatMem(t, 4096)
	b := memBytes(t, dev, 0, binHeaderSize)
	if binary.BigEndian.Uint64(b[offHdrSize:]) != HeaderSize || binary.BigEndian.Uint64(b[offSeqid:]) != h.Seqid() {
		t.Fatal("hdr_size or seqid")
	}
	if string(bytes.TrimRight(b[offCsumAlg:offCsumAlg+csumAlgLen], "\x00")) != "sha256" {
		t.Fatal("csum_alg")
	}
	// A misplaced header (hdr_offset lies) is refused.
	s := memBytes(t, dev, HeaderSize, HeaderSize)
	binary.BigEndian.PutUint64(s[offHdrOffset:], 0)
	sum := checksum(s)
	copy(s[offCsum:], sum[:])
	dev.WriteAt(s, HeaderSize)
	h2, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if bad, why := h2.NeedsRepair(); !bad || !strings.Contains(why.Error(), "offset") {
		t.Fatalf("misplaced secondary accepted: %v", why)
	}
}

func readFile(p string) ([]byte, error) { return os.ReadFile(p) }

// TestPrimaryGone: with the primary's binary header wiped, the secondary is found by
// scanning the offsets of the specification; if it is damaged too, the error says
// damaged, not "no header".
func TestPrimaryGone(t *testing.T) {
	dev, _, vk, pass := formatMem(t, 4096)
	dev.WriteAt(make([]byte, binHeaderSize), 0)
	h, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if bad, why := h.NeedsRepair(); !bad || !strings.Contains(why.Error(), "primary header damaged") {
		t.Fatalf("%v", why)
	}
	if k, _, err := h.Unlock(dev, pass); err != nil || !bytes.Equal(k, vk) {
		t.Fatal(err)
	}
	if err := h.Repair(dev); err != nil {
		t.Fatal(err)
	}
	if h2, err := Load(dev); err != nil {
		t.Fatal(err)
	} else if bad, _ := h2.NeedsRepair(); bad {
		t.Fatal("primary not rewritten")
	}
	dev.WriteAt(make([]byte, binHeaderSize), 0)
	corrupt(t, dev, 1)
	if _, err := Load(dev); !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "checksum") {
		t.Fatalf("want ErrDamaged naming the checksum, got %v", err)
	}
}
