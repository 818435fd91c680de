// Package luks2test holds what the tests of luks2, keystore and the atrest command
// share to check LUKS2 images against the reference implementation, cryptsetup 2.6
// (which works on image files without dm-crypt for everything but activation). It is
// for tests only; nothing is safe for concurrent use beyond what the commands allow.
package luks2test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/testutil"
)

// Cryptsetup returns the path of cryptsetup, or skips the test (fails it in CI).
func Cryptsetup(t testing.TB) string {
	t.Helper()
	return testutil.Tool(t, "cryptsetup")
}

// Run runs cryptsetup with args and returns its combined output and error.
func Run(t testing.TB, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(Cryptsetup(t), args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// MustRun runs cryptsetup and fails the test if it fails.
func MustRun(t testing.TB, args ...string) string {
	t.Helper()
	out, err := Run(t, args...)
	if err != nil {
		t.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// KeyFile writes key to a new file in a temporary directory and returns its path.
func KeyFile(t testing.TB, key []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(p, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Opens reports whether `cryptsetup open --test-passphrase --key-file` accepts the
// key file for the image, with cryptsetup's output.
func Opens(t testing.TB, image, keyFile string) (bool, string) {
	t.Helper()
	out, err := Run(t, "open", "--test-passphrase", "--key-file", keyFile, image)
	if err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("cryptsetup: %v", err)
		}
		return false, out
	}
	return true, out
}

// VolumeKey returns the volume key that `cryptsetup luksDump --dump-volume-key`
// prints for the image with the key file.
func VolumeKey(t testing.TB, image, keyFile string) []byte {
	t.Helper()
	out := MustRun(t, "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, image)
	var hexKey strings.Builder
	in := false
	for _, line := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(line, "MK dump:"); ok {
			in = true
			line = rest
		} else if in && !strings.HasPrefix(line, "\t") {
			break
		}
		if in {
			hexKey.WriteString(strings.ReplaceAll(strings.TrimSpace(line), " ", ""))
		}
	}
	k, err := hex.DecodeString(hexKey.String())
	if err != nil || len(k) == 0 {
		t.Fatalf("cannot read the volume key from luksDump:\n%s", out)
	}
	return k
}

// Format runs `cryptsetup luksFormat --type luks2 --batch-mode --key-file keyFile`
// with the extra arguments on the image.
func Format(t testing.TB, image, keyFile string, extra ...string) {
	t.Helper()
	args := append([]string{"luksFormat", "--type", "luks2", "--batch-mode", "--key-file", keyFile}, extra...)
	MustRun(t, append(args, image)...)
}

// FastPBKDF2 are luksFormat arguments for a cheap PBKDF2 keyslot.
var FastPBKDF2 = []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}

// SparseImage creates a sparse file of size bytes in a temporary directory.
func SparseImage(t testing.TB, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "drive.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}

// InCryptsetup reports whether cryptsetup is installed, for checks that add to a
// test rather than make it (it still fails in CI when missing).
func InCryptsetup(t testing.TB) bool {
	t.Helper()
	if _, err := exec.LookPath("cryptsetup"); err == nil {
		return true
	}
	if testutil.InCI() {
		t.Fatal("CI=true and cryptsetup is missing")
	}
	return false
}

// OpenReadOnly opens an image as a read-only blockdev.File.
func OpenReadOnly(path string) (*blockdev.File, error) {
	return blockdev.OpenFile(path, blockdev.FileOptions{ReadOnly: true})
}

// EditJSON edits the metadata of both header copies of a LUKS2 image and writes them
// back with valid checksums, as a crafted header would be: the binary header's
// hdr_size is at offset 8 (big-endian), the checksum (SHA-256 of the copy with the
// field zeroed) at 0x1C0, the NUL-padded JSON after the first 4096 bytes
// (specification §2). Numbers in the tree are json.Number.
func EditJSON(t testing.TB, image string, edit func(root map[string]any)) {
	t.Helper()
	const binSize, offCsum, csumLen = 4096, 0x1C0, 64
	f, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var size [8]byte
	if _, err := f.ReadAt(size[:], 8); err != nil {
		t.Fatal(err)
	}
	hdrSize := int64(binary.BigEndian.Uint64(size[:]))
	for _, off := range []int64{0, hdrSize} {
		area := make([]byte, hdrSize)
		if _, err := f.ReadAt(area, off); err != nil {
			t.Fatal(err)
		}
		text, _, _ := bytes.Cut(area[binSize:], []byte{0})
		d := json.NewDecoder(bytes.NewReader(text))
		d.UseNumber()
		var root map[string]any
		if err := d.Decode(&root); err != nil {
			t.Fatalf("header JSON at %d: %v", off+binSize, err)
		}
		edit(root)
		text, err := json.Marshal(root)
		if err != nil {
			t.Fatal(err)
		}
		clear(area[binSize:])
		copy(area[binSize:], text)
		clear(area[offCsum : offCsum+csumLen])
		sum := sha256.Sum256(area)
		copy(area[offCsum:], sum[:])
		if _, err := f.WriteAt(area, off); err != nil {
			t.Fatal(err)
		}
	}
}
