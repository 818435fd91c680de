package blockcrypt

import (
	"bytes"
	"crypto/aes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	"golang.org/x/crypto/xts"
)

// TestDifferentialXCrypto compares every implementation with golang.org/x/crypto/xts on
// random keys, IVs, sector sizes and run lengths. x/crypto's "sector number" is the
// tweak; for a run of 4096-byte sectors it is iv + k*8, the 512-byte-unit IV of LUKS2.
func TestDifferentialXCrypto(t *testing.T) {
	forEachImplementation(t, func(t *testing.T, impl *implementation) {
		rng := rand.New(rand.NewPCG(1, 2))
		for range 200 {
			key := randomKey(rng)
			ref, err := xts.NewCipher(aes.NewCipher, key)
			if err != nil {
				t.Fatal(err)
			}
			c := mustCipher(t, impl, key)
			sectorSize := []int{512, 4096}[rng.IntN(2)]
			sectors := 1 + rng.IntN(5)
			iv := rng.Uint64()
			if rng.IntN(4) == 0 {
				iv = ^uint64(0) - uint64(rng.IntN(40)) // wrap-around of the 64-bit IV
			}
			src := make([]byte, sectors*sectorSize)
			fillRandom(rng, src)
			want := make([]byte, len(src))
			for k := range sectors {
				s := src[k*sectorSize : (k+1)*sectorSize]
				ref.Encrypt(want[k*sectorSize:(k+1)*sectorSize], s, iv+uint64(k*sectorSize/512))
			}
			got := make([]byte, len(src))
			c.EncryptSectors(got, src, sectorSize, iv)
			if !bytes.Equal(got, want) {
				t.Fatalf("encrypt: sector size %d, %d sectors, iv %#x: differs from x/crypto/xts", sectorSize, sectors, iv)
			}
			back := bytes.Clone(got)
			c.DecryptSectors(back, back, sectorSize, iv)
			if !bytes.Equal(back, src) {
				t.Fatalf("decrypt in place: sector size %d, iv %#x: round trip failed", sectorSize, iv)
			}
			// A run is the same as its sectors one by one.
			one := make([]byte, sectorSize)
			k := rng.IntN(sectors)
			c.EncryptSectors(one, src[k*sectorSize:(k+1)*sectorSize], sectorSize, iv+uint64(k*sectorSize/512))
			if !bytes.Equal(one, want[k*sectorSize:(k+1)*sectorSize]) {
				t.Fatalf("sector %d of a run differs when encrypted alone", k)
			}
		}
	})
}

// TestRawUnitLengths checks data units of every whole-block length up to 8 KiB against
// x/crypto/xts (which takes any length as one data unit with a uint64 tweak).
func TestRawUnitLengths(t *testing.T) {
	forEachImplementation(t, func(t *testing.T, impl *implementation) {
		rng := rand.New(rand.NewPCG(3, 4))
		key := randomKey(rng)
		ref, _ := xts.NewCipher(aes.NewCipher, key)
		c := mustCipher(t, impl, key)
		for n := 16; n <= 8192; n += 16 {
			if n > 1024 && n%1024 != 16 && n%4096 != 0 {
				continue
			}
			src := make([]byte, n)
			fillRandom(rng, src)
			num := rng.Uint64()
			var tweak [16]byte
			binary.LittleEndian.PutUint64(tweak[:], num)
			want := make([]byte, n)
			ref.Encrypt(want, src, num)
			got := make([]byte, n)
			c.encryptUnit(got, src, &tweak)
			if !bytes.Equal(got, want) {
				t.Fatalf("data unit of %d bytes differs from x/crypto/xts", n)
			}
			c.decryptUnit(got, got, &tweak)
			if !bytes.Equal(got, src) {
				t.Fatalf("data unit of %d bytes: round trip failed", n)
			}
		}
	})
}

func TestMulAlpha(t *testing.T) {
	for _, tc := range []struct{ lo, hi, wantLo, wantHi uint64 }{
		{1, 0, 2, 0},
		{1 << 63, 0, 0, 1},
		{0, 1 << 63, 0x87, 0},
		{^uint64(0), ^uint64(0), 0xfffffffffffffffe ^ 0x87, ^uint64(0)},
		{0x8000000000000001, 0x8000000000000000, 0x2 ^ 0x87, 1},
	} {
		lo, hi := mulAlpha(tc.lo, tc.hi)
		if lo != tc.wantLo || hi != tc.wantHi {
			t.Errorf("mulAlpha(%#x, %#x) = %#x, %#x, want %#x, %#x", tc.lo, tc.hi, lo, hi, tc.wantLo, tc.wantHi)
		}
	}
}

func TestNewCipherErrors(t *testing.T) {
	for _, n := range []int{0, 16, 32, 48, 63, 65, 128} {
		_, err := NewCipher(make([]byte, n))
		if !errors.Is(err, ErrKeySize) {
			t.Errorf("key of %d bytes: err = %v, want ErrKeySize", n, err)
		}
	}
	key := testKey(1)
	copy(key[32:], key[:32])
	if _, err := NewCipher(key); !errors.Is(err, ErrWeakKey) {
		t.Errorf("equal halves: err = %v, want ErrWeakKey", err)
	}
	key[63] ^= 1
	c, err := NewCipher(key)
	if err != nil {
		t.Errorf("halves differing in one bit: %v", err)
	} else {
		c.Close()
	}
	// The Cipher keeps its own copy: changing the caller's key changes nothing.
	key = testKey(2)
	c, _ = NewCipher(key)
	defer c.Close()
	a := make([]byte, 512)
	c.EncryptSectors(a, a, 512, 0)
	clear(key)
	b := make([]byte, 512)
	c.EncryptSectors(b, b, 512, 0)
	if !bytes.Equal(a, b) {
		t.Error("the Cipher depends on the caller's key buffer")
	}
}

func expectPanic(t *testing.T, what, want string, f func()) {
	t.Helper()
	defer func() {
		t.Helper()
		r := recover()
		if r == nil {
			t.Errorf("%s: no panic", what)
			return
		}
		if s, _ := r.(string); !strings.HasPrefix(s, "BUG: ") || !strings.Contains(s, want) {
			t.Errorf("%s: panic %v, want a BUG panic containing %q", what, r, want)
		}
	}()
	f()
}

func TestCipherMisuse(t *testing.T) {
	c, err := NewCipher(testKey(3))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8192)
	expectPanic(t, "sector size 1024", "sector size", func() { c.EncryptSectors(buf, buf, 1024, 0) })
	expectPanic(t, "sector size 0", "sector size", func() { c.DecryptSectors(buf, buf, 0, 0) })
	expectPanic(t, "partial sector", "whole number", func() { c.EncryptSectors(buf[:600], buf[:600], 512, 0) })
	expectPanic(t, "short dst", "output", func() { c.EncryptSectors(buf[:512], buf[:1024], 512, 0) })
	expectPanic(t, "inexact overlap", "overlap", func() { c.EncryptSectors(buf[16:528], buf[:512], 512, 0) })
	expectPanic(t, "raw unit of 17 bytes", "multiple of 16", func() { c.encryptUnit(buf[:17], buf[:17], new([16]byte)) })
	// Legal edge cases do not panic.
	c.EncryptSectors(buf[:0], buf[:0], 512, 0)
	c.EncryptSectors(buf[:512], buf[512:1024], 512, 0)
	c.Close()
	expectPanic(t, "use after Close", "after Close", func() { c.EncryptSectors(buf, buf, 512, 0) })
	expectPanic(t, "decrypt after Close", "after Close", func() { c.DecryptSectors(buf, buf, 512, 0) })
	c.Close() // idempotent
}

// TestCipherConcurrent uses one Cipher from several goroutines (run with -race).
func TestCipherConcurrent(t *testing.T) {
	forEachImplementation(t, func(t *testing.T, impl *implementation) {
		c := mustCipher(t, impl, testKey(4))
		src := make([]byte, 4*4096)
		fillRandom(rand.New(rand.NewPCG(5, 6)), src)
		want := make([]byte, len(src))
		c.EncryptSectors(want, src, 4096, 99)
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				got := make([]byte, len(src))
				for range 50 {
					c.EncryptSectors(got, src, 4096, 99)
					if !bytes.Equal(got, want) {
						t.Error("concurrent encryption differs")
						return
					}
					c.DecryptSectors(got, got, 4096, 99)
					if !bytes.Equal(got, src) {
						t.Error("concurrent decryption differs")
						return
					}
				}
			})
		}
		wg.Wait()
	})
}

func randomKey(rng *rand.Rand) []byte {
	key := make([]byte, KeySize)
	for {
		fillRandom(rng, key)
		if !bytes.Equal(key[:32], key[32:]) {
			return key
		}
	}
}

func fillRandom(rng *rand.Rand, b []byte) {
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
}
