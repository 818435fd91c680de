package luks2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

// fixChecksum makes the primary copy in img pass its checksum, if its hdr_size field
// allows one, so that mutations reach the JSON parser (cryptsetup's
// tests/fuzz/crypt2_load_fuzz does the same).
func fixChecksum(img []byte) {
	if len(img) < binHeaderSize {
		return
	}
	hs := binary.BigEndian.Uint64(img[offHdrSize:])
	if !validHdrSize(hs) || hs > uint64(len(img)) {
		return
	}
	setChecksum(img[:hs])
}

// FuzzHeader feeds mutated primary header copies (checksum fixed up) to Load. Load
// must not panic; a header it accepts must marshal to JSON that parses to the same
// metadata, must survive a write (SetAtrestToken) and load again, and every keyslot
// must pass or fail the allow-list without deriving anything.
func FuzzHeader(f *testing.F) {
	dev, _, _, _ := formatMem(f, 4096)
	f.Add(memBytes(f, dev, 0, HeaderSize))
	dev, h, _, _ := formatMem(f, 512)
	h.SetAtrestToken(dev, &AtrestToken{Keyslots: []int{0}, ClusterUUID: "c", Volume: "v", VolumeUUID: "u", MemberCount: 1, MasterKeyID: "m"})
	f.Add(memBytes(f, dev, 0, HeaderSize))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 2*HeaderSize {
			return
		}
		img := make([]byte, 2*HeaderSize)
		copy(img, data)
		fixChecksum(img)
		dev := blockdev.NewMem(4 * HeaderSize)
		dev.WriteAt(img, 0)
		h, err := Load(dev)
		if err != nil {
			return
		}
		text := h.JSON()
		root, err := decodeJSON(text)
		if err != nil {
			t.Fatalf("accepted metadata does not reparse: %v", err)
		}
		if _, err := parseMeta(root, h.HeaderSize()); err != nil {
			t.Fatalf("accepted metadata does not revalidate: %v", err)
		}
		if !bytes.Equal(encodeJSON(root), text) {
			t.Fatal("marshal is not stable")
		}
		for _, ks := range h.Keyslots() {
			checkKeyslot(&ks)
		}
		if _, err := h.AtrestToken(); err != nil {
			return
		}
		tok := &AtrestToken{ClusterUUID: "c", Volume: "v", VolumeUUID: "u", MemberCount: 1, MasterKeyID: "m"}
		if err := h.SetAtrestToken(dev, tok); err != nil {
			return
		}
		h2, err := Load(dev)
		if err != nil {
			t.Fatalf("a header atrest wrote does not load: %v", err)
		}
		if bad, why := h2.NeedsRepair(); bad {
			t.Fatalf("a header atrest wrote needs repair: %v", why)
		}
	})
}

// TestCryptsetupSeedsLoad: the seed corpus headers that cryptsetup 2.6 wrote (only
// their primary copy, trailing zeroes trimmed) load, so the fuzzer starts from
// accepted headers.
func TestCryptsetupSeedsLoad(t *testing.T) {
	for _, name := range []string{"cryptsetup-pbkdf2", "cryptsetup-argon2id", "cryptsetup-label-token"} {
		b, err := readFuzzSeed(filepath.Join("testdata", "fuzz", "FuzzHeader", name))
		if err != nil {
			t.Fatal(err)
		}
		dev := blockdev.NewMem(4 * HeaderSize)
		dev.WriteAt(b, 0)
		h, err := Load(dev)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if bad, _ := h.NeedsRepair(); !bad {
			t.Fatalf("%s: the missing secondary copy went unnoticed", name)
		}
	}
}

// readFuzzSeed decodes a one-value []byte file of the fuzz corpus format.
func readFuzzSeed(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	_, lit, ok := strings.Cut(string(b), "\n[]byte(")
	if !ok {
		return nil, fmt.Errorf("%s: not a []byte corpus file", path)
	}
	s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimSpace(lit), ")"))
	return []byte(s), err
}
