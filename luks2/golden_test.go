package luks2

import (
	"bytes"
	"compress/gzip"
	"encoding/hex"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/luks2/luks2test"
)

// go test ./luks2 -run TestGolden -update rewrites the golden files. Do it only for a
// new format version, with new file names: the old ones must keep opening.
var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

const (
	goldenImage     = "testdata/golden-v1.img.gz"
	goldenKey       = "testdata/golden-v1.key"        // the passphrase (a master key file)
	goldenVolumeKey = "testdata/golden-v1.volume-key" // hex
	goldenSize      = DataOffset + 8192
)

var goldenToken = AtrestToken{
	ClusterUUID: "0b5c54b5-4c1e-4d7e-9b56-7e0e1f0a2b3c", Volume: "golden",
	VolumeUUID: "5e0d2a8c-8f55-4b8e-a6a4-0c9d1a2b3c4d", MemberIndex: 0, MemberCount: 1,
	MasterKeyID: "mk-0123456789abcdef",
}

// goldenData is the plaintext of the two data sectors of the golden image.
func goldenData() []byte {
	return bytes.Repeat([]byte("atrest golden v1 "), 8192/17+1)[:8192]
}

func writeGolden(t *testing.T) {
	img := filepath.Join(t.TempDir(), "golden.img")
	os.WriteFile(img, nil, 0o600)
	os.Truncate(img, goldenSize)
	dev := openFile(t, img)
	vk, pass := newKey(t, KeySize), newKey(t, 32)
	tok := goldenToken
	if _, err := Format(dev, FormatOptions{VolumeKey: vk, Passphrase: pass, UUID: "6a1f3c9e-2d4b-4e8f-9a7c-1b2d3e4f5a6b", Token: &tok}); err != nil {
		t.Fatal(err)
	}
	c, err := blockcrypt.NewCipher(vk)
	if err != nil {
		t.Fatal(err)
	}
	ct := make([]byte, 8192)
	c.EncryptSectors(ct, goldenData(), 4096, 0)
	dev.WriteAt(ct, DataOffset)
	raw, _ := os.ReadFile(img)
	var gz bytes.Buffer
	w, _ := gzip.NewWriterLevel(&gz, gzip.BestCompression)
	w.Write(raw)
	w.Close()
	for name, b := range map[string][]byte{goldenImage: gz.Bytes(), goldenKey: pass, goldenVolumeKey: []byte(hex.EncodeToString(vk) + "\n")} {
		if err := os.WriteFile(name, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestGolden: the header this version wrote (testdata/golden-v1.*) keeps opening,
// with the same volume key, token and data.
func TestGolden(t *testing.T) {
	if *update {
		writeGolden(t)
	}
	f, err := os.Open(goldenImage)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "golden.img")
	if err := os.WriteFile(img, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	pass, _ := os.ReadFile(goldenKey)
	vkHex, _ := os.ReadFile(goldenVolumeKey)
	want, err := hex.DecodeString(strings.TrimSpace(string(vkHex)))
	if err != nil {
		t.Fatal(err)
	}
	dev := openFile(t, img)
	h, err := Load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if bad, why := h.NeedsRepair(); bad {
		t.Fatal(why)
	}
	vk, slot, err := h.Unlock(dev, pass)
	if err != nil || slot != 0 || !bytes.Equal(vk, want) {
		t.Fatalf("slot %d, %v, key matches %v", slot, err, bytes.Equal(vk, want))
	}
	tok, err := h.AtrestToken()
	if err != nil {
		t.Fatal(err)
	}
	wantTok := goldenToken
	wantTok.Keyslots = []int{0}
	if tok == nil || tok.ClusterUUID != wantTok.ClusterUUID || tok.Volume != wantTok.Volume || tok.VolumeUUID != wantTok.VolumeUUID ||
		tok.MemberCount != 1 || tok.MasterKeyID != wantTok.MasterKeyID || len(tok.Keyslots) != 1 || tok.Keyslots[0] != 0 {
		t.Fatalf("token %+v", tok)
	}
	if s := h.Segment(); s.Offset != DataOffset || s.SectorSize != 4096 || h.UUID() != "6a1f3c9e-2d4b-4e8f-9a7c-1b2d3e4f5a6b" {
		t.Fatalf("segment %+v uuid %s", s, h.UUID())
	}
	c, _ := blockcrypt.NewCipher(vk)
	pt := make([]byte, 8192)
	c.DecryptSectors(pt, raw[DataOffset:DataOffset+8192], 4096, 0)
	if !bytes.Equal(pt, goldenData()) {
		t.Fatal("golden data does not decrypt")
	}
	if luks2test.InCryptsetup(t) {
		if ok, out := luks2test.Opens(t, img, goldenKey); !ok {
			t.Fatalf("cryptsetup refuses the golden image: %s", out)
		}
	}
}
