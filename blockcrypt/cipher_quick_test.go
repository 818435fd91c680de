package blockcrypt

import (
	"bytes"
	"crypto/rand"
	"testing"

	"golang.org/x/crypto/xts"
)

func TestCipherMatchesXCrypto(t *testing.T) {
	key := make([]byte, 64)
	rand.Read(key)
	ref, err := xts.NewCipher(aesNew, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	for _, ss := range []int{512, 4096} {
		src := make([]byte, 3*ss)
		rand.Read(src)
		got := make([]byte, len(src))
		c.EncryptSectors(got, src, ss, 77)
		want := make([]byte, len(src))
		for k := 0; k < 3; k++ {
			ref.Encrypt(want[k*ss:(k+1)*ss], src[k*ss:(k+1)*ss], 77+uint64(k*ss/512))
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("sector size %d: differs from x/crypto/xts", ss)
		}
		c.DecryptSectors(got, got, ss, 77)
		if !bytes.Equal(got, src) {
			t.Fatalf("sector size %d: round trip failed", ss)
		}
	}
}
