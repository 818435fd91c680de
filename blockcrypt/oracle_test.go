package blockcrypt

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/testutil"
)

// oracleScript encrypts or decrypts the region of a drive image with python3-cryptography
// (OpenSSL's AES-XTS underneath), sector by sector, with the LUKS2 IV rule written out
// independently: the tweak of the sector at region offset o is (iv_tweak + o/512) mod
// 2^64 as 16 little-endian bytes.
const oracleScript = `
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
mode, image, key, offset, size, ss, iv_tweak, plain = sys.argv[1:]
key = bytes.fromhex(key)
offset, size, ss, iv_tweak = int(offset), int(size), int(ss), int(iv_tweak)
with open(image, "r+b") as f:
    if mode == "decrypt":
        f.seek(offset)
        region = f.read(size)
        out = bytearray()
        for o in range(0, size, ss):
            tweak = ((iv_tweak + o // 512) % 2**64).to_bytes(16, "little")
            d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
            out += d.update(region[o:o+ss]) + d.finalize()
        with open(plain, "wb") as p:
            p.write(out)
    else:
        with open(plain, "rb") as p:
            data = p.read()
        assert len(data) == size
        out = bytearray()
        for o in range(0, size, ss):
            tweak = ((iv_tweak + o // 512) % 2**64).to_bytes(16, "little")
            e = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
            out += e.update(data[o:o+ss]) + e.finalize()
        f.seek(offset)
        f.write(out)
`

func runOracle(t *testing.T, py, mode, image string, key []byte, offset, size int64, ss int, tweak uint64, plain string) {
	t.Helper()
	cmd := exec.Command(py, "-c", oracleScript, mode, image, hex.EncodeToString(key),
		fmt.Sprint(offset), fmt.Sprint(size), fmt.Sprint(ss), fmt.Sprint(tweak), plain)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("python oracle (%s): %v\n%s", mode, err, out)
	}
}

// TestPythonOracle checks the Device over a real File against python3-cryptography in
// both directions: what atrest writes, python decrypts; what python encrypts, atrest
// reads. Both sector sizes, a region behind a gap, and IV tweaks that are nonzero and
// that wrap around 2^64.
func TestPythonOracle(t *testing.T) {
	py := testutil.Python3(t)
	forEachImplementation(t, func(t *testing.T, impl *implementation) {
		for _, tc := range []struct {
			ss    int
			tweak uint64
		}{{4096, 1000003}, {512, 1000003}, {4096, 1<<64 - 20}, {512, 1<<64 - 3}} {
			t.Run(fmt.Sprintf("sector%d_tweak%d", tc.ss, tc.tweak), func(t *testing.T) {
				oracleCase(t, py, impl, tc.ss, tc.tweak)
			})
		}
	})
}

func oracleCase(t *testing.T, py string, impl *implementation, ss int, tweak uint64) {
	const offset, size, slack = 16 << 10, 96 << 10, 8 << 10
	dir := t.TempDir()
	image := filepath.Join(dir, "drive.img")
	plainPath := filepath.Join(dir, "plain")
	rng := rand.New(rand.NewPCG(uint64(ss), tweak))
	key := randomKey(rng)
	cfg := Config{Key: key, Offset: offset, Size: size, SectorSize: ss, IVTweak: tweak}
	open := func() *Device {
		f, err := blockdev.OpenFile(image, blockdev.FileOptions{})
		if err != nil {
			t.Fatal(err)
		}
		d, err := newDevice(f, cfg, impl)
		if err != nil {
			f.Close()
			t.Fatal(err)
		}
		return d
	}
	if err := os.WriteFile(image, make([]byte, offset+size+slack), 0o600); err != nil {
		t.Fatal(err)
	}

	// atrest writes (whole, then partial overwrites), python decrypts.
	model := make([]byte, size)
	fillRandom(rng, model)
	d := open()
	if _, err := d.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	for range 50 {
		off := rng.Int64N(size)
		p := make([]byte, rng.Int64N(min(size-off, 3*int64(ss))+1))
		fillRandom(rng, p)
		if _, err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	runOracle(t, py, "decrypt", image, key, offset, size, ss, tweak, plainPath)
	got, err := os.ReadFile(plainPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatalf("python decrypts something else than atrest wrote (first difference at %d)", firstDifference(got, model))
	}
	raw, _ := os.ReadFile(image)
	if !allZero(raw[:offset]) || !allZero(raw[offset+size:]) {
		t.Fatal("atrest wrote outside the region")
	}

	// python encrypts, atrest reads.
	fillRandom(rng, model)
	if err := os.WriteFile(plainPath, model, 0o600); err != nil {
		t.Fatal(err)
	}
	runOracle(t, py, "encrypt", image, key, offset, size, ss, tweak, plainPath)
	d = open()
	defer d.Close()
	got = make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatalf("atrest reads something else than python encrypted (first difference at %d)", firstDifference(got, model))
	}
	// And a few unaligned reads.
	for range 20 {
		off := rng.Int64N(size)
		p := make([]byte, rng.Int64N(min(size-off, 2*int64(ss))+1))
		if _, err := d.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, model[off:off+int64(len(p))]) {
			t.Fatalf("unaligned read at %d of %d bytes differs", off, len(p))
		}
	}
}

func firstDifference(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
