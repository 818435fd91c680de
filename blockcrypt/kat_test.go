package blockcrypt

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os"
	"testing"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex in test data: %v", err)
	}
	return b
}

// checkUnit encrypts and decrypts one data unit through the raw-tweak entry point, in
// place and out of place, and reports whether the ciphertext matched.
func checkUnit(t *testing.T, c *Cipher, tweak *[16]byte, pt, ct []byte) bool {
	t.Helper()
	got := make([]byte, len(pt))
	c.encryptUnit(got, pt, tweak)
	match := bytes.Equal(got, ct)
	inPlace := bytes.Clone(pt)
	c.encryptUnit(inPlace, inPlace, tweak)
	if !bytes.Equal(inPlace, got) {
		t.Errorf("in-place encryption differs from out-of-place")
	}
	back := make([]byte, len(ct))
	c.decryptUnit(back, ct, tweak)
	if match != bytes.Equal(back, pt) {
		t.Errorf("decryption disagrees with encryption: encrypt matched %v", match)
	}
	c.decryptUnit(inPlace, inPlace, tweak)
	if !bytes.Equal(inPlace, pt) {
		t.Errorf("in-place round trip failed")
	}
	return match
}

func TestIEEEP1619(t *testing.T) {
	var vectors []struct {
		Key, Tweak, Plaintext, Ciphertext string
		DataUnit                          uint64
	}
	data, err := os.ReadFile("testdata/ieee-p1619-annex-b-aes256.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &vectors); err != nil {
		t.Fatal(err)
	}
	if len(vectors) == 0 {
		t.Fatal("no vectors")
	}
	forEachImplementation(t, func(t *testing.T, impl *implementation) {
		for i, v := range vectors {
			c := mustCipher(t, impl, unhex(t, v.Key))
			tweak := [16]byte(unhex(t, v.Tweak))
			pt, ct := unhex(t, v.Plaintext), unhex(t, v.Ciphertext)
			if !checkUnit(t, c, &tweak, pt, ct) {
				t.Errorf("vector %d: ciphertext differs", i)
			}
			// The same vector through the sector API: a 512-byte data unit whose
			// plain64 IV is the data unit number.
			if len(pt) == 512 {
				got := make([]byte, 512)
				c.EncryptSectors(got, pt, 512, v.DataUnit)
				if !bytes.Equal(got, ct) {
					t.Errorf("vector %d: EncryptSectors differs", i)
				}
			}
		}
	})
}

// TestWycheproof runs the XTS-AES-256 cases of Wycheproof whose message is a whole
// number of blocks (no ciphertext stealing in atrest).
func TestWycheproof(t *testing.T) {
	var file struct {
		Algorithm     string
		NumberOfTests int
		TestGroups    []struct {
			KeySize int
			IVSize  int
			Tests   []struct {
				TcID    int
				Comment string
				Key     string
				IV      string
				Msg     string
				Ct      string
				Result  string
				Flags   []string
			}
		}
	}
	data, err := os.ReadFile("testdata/wycheproof-aes_xts_test.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &file); err != nil {
		t.Fatal(err)
	}
	if file.Algorithm != "AES-XTS" {
		t.Fatalf("algorithm %q", file.Algorithm)
	}
	forEachImplementation(t, func(t *testing.T, impl *implementation) {
		ran := 0
		for _, g := range file.TestGroups {
			if g.KeySize != 8*KeySize {
				continue
			}
			for _, tc := range g.Tests {
				msg, ct := unhex(t, tc.Msg), unhex(t, tc.Ct)
				if len(msg)%16 != 0 {
					continue
				}
				ran++
				iv := unhex(t, tc.IV)
				if len(iv) > 16 {
					t.Fatalf("tcId %d: iv of %d bytes", tc.TcID, len(iv))
				}
				var tweak [16]byte
				copy(tweak[:], iv)
				c, err := newCipherWith(impl, unhex(t, tc.Key))
				if err != nil {
					if tc.Result == "valid" {
						t.Errorf("tcId %d (%s): key refused: %v", tc.TcID, tc.Comment, err)
					}
					continue
				}
				match := checkUnit(t, c, &tweak, msg, ct)
				c.Close()
				switch tc.Result {
				case "valid":
					if !match {
						t.Errorf("tcId %d (%s): ciphertext differs", tc.TcID, tc.Comment)
					}
				case "invalid":
					if match {
						t.Errorf("tcId %d (%s): invalid case accepted", tc.TcID, tc.Comment)
					}
				default:
					// "acceptable": either outcome is allowed.
				}
			}
		}
		if ran < 20 {
			t.Fatalf("only %d XTS-AES-256 cases ran", ran)
		}
		t.Logf("%d XTS-AES-256 cases", ran)
	})
}
