package blockcrypt

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"unsafe"
)

// KeySize is the size of an XTS-AES-256 key: key1 (data) followed by key2 (tweak).
const KeySize = 64

var (
	// ErrKeySize is returned for a key that is not KeySize bytes long.
	ErrKeySize = errors.New("XTS-AES-256 key must be 64 bytes")
	// ErrWeakKey is returned for a key whose two halves are equal, which IEEE
	// P1619-2018 §5.1 forbids (the tweak would be encrypted with the data key).
	ErrWeakKey = errors.New("XTS key halves are equal")
)

// Cipher is XTS-AES-256 with LUKS2 aes-xts-plain64 IV semantics. Safe for concurrent
// use, except Close, which must not race with other calls.
type Cipher struct {
	impl *implementation
	x    crypter // nil after Close
}

// NewCipher returns a Cipher for key, which must be 64 bytes (key1 || key2) with
// key1 != key2. The Cipher keeps its own copy of the key material.
func NewCipher(key []byte) (*Cipher, error) {
	return newCipherWith(bestImplementation(), key)
}

// NewCipherImpl is NewCipher with the implementation named impl, one of those
// Implementations returns: for measuring and comparing them (package xtsspeed). The
// data path uses NewCipher.
func NewCipherImpl(impl string, key []byte) (*Cipher, error) {
	for _, i := range implementations {
		if i.name == impl {
			if !i.available {
				return nil, fmt.Errorf("XTS implementation %q: this CPU cannot run it", impl)
			}
			return newCipherWith(i, key)
		}
	}
	return nil, fmt.Errorf("unknown XTS implementation %q", impl)
}

// newCipherWith is NewCipher with a chosen implementation (tests, benchmarks).
func newCipherWith(impl *implementation, key []byte) (*Cipher, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("key of %d bytes: %w", len(key), ErrKeySize)
	}
	if subtle.ConstantTimeCompare(key[:32], key[32:]) == 1 {
		return nil, ErrWeakKey
	}
	return &Cipher{impl: impl, x: impl.newCrypter(key[:32], key[32:])}, nil
}

// Implementation returns the name of the XTS implementation the Cipher uses.
func (c *Cipher) Implementation() string { return c.impl.name }

// EncryptSectors encrypts src into dst. dst and src may be the same slice (exact overlap
// only) and dst must be at least as long as src. len(src) must be a multiple of
// sectorSize, which must be 512 or 4096. Sector k of the run uses the IV
// iv + k*(sectorSize/512), as a little-endian 128-bit tweak whose upper 64 bits are zero
// (plain64), encrypted with key2: the IV counts 512-byte units whatever the sector
// size, as cryptsetup does for LUKS2 data segments. Breaking these rules panics.
func (c *Cipher) EncryptSectors(dst, src []byte, sectorSize int, iv uint64) {
	c.check(dst, src, sectorSize)
	c.x.encryptSectors(dst[:len(src)], src, sectorSize, iv)
}

// DecryptSectors decrypts src into dst; the rules of EncryptSectors apply.
func (c *Cipher) DecryptSectors(dst, src []byte, sectorSize int, iv uint64) {
	c.check(dst, src, sectorSize)
	c.x.decryptSectors(dst[:len(src)], src, sectorSize, iv)
}

// Close zeroes the key material the Cipher owns; any later use panics. The AES key
// schedules inside crypto/aes (used by the pure-Go implementation) are beyond reach:
// they are dropped for the garbage collector but cannot be zeroed from outside.
func (c *Cipher) Close() {
	if c.x == nil {
		return
	}
	c.x.wipe()
	c.x = nil
}

func (c *Cipher) check(dst, src []byte, sectorSize int) {
	// The conditions are tested here and the panic messages built out of line, in
	// badCall: with the fmt.Sprintf calls in this function's own body, one 512-byte
	// sector took 13 ns (15%) longer in the assembly paths on Zen 4 (measured, cause
	// not pinned down: this frame got larger and spilled more around the calls).
	if c.x == nil || (sectorSize != 512 && sectorSize != 4096) || len(src)%sectorSize != 0 ||
		len(dst) < len(src) || inexactOverlap(dst[:len(src)], src) {
		c.badCall(dst, src, sectorSize)
	}
}

// badCall panics with the first rule that check found broken.
//
//go:noinline
func (c *Cipher) badCall(dst, src []byte, sectorSize int) {
	if c.x == nil {
		panic("BUG: blockcrypt: Cipher used after Close")
	}
	if sectorSize != 512 && sectorSize != 4096 {
		panic(fmt.Sprintf("BUG: blockcrypt: sector size %d (want 512 or 4096)", sectorSize))
	}
	if len(src)%sectorSize != 0 {
		panic(fmt.Sprintf("BUG: blockcrypt: %d bytes is not a whole number of %d-byte sectors", len(src), sectorSize))
	}
	checkBuffers(dst, src)
	panic("BUG: blockcrypt: check and badCall disagree")
}

// checkBuffers panics unless dst holds src and the two are the same memory or disjoint.
func checkBuffers(dst, src []byte) {
	if len(dst) < len(src) {
		panic(fmt.Sprintf("BUG: blockcrypt: output of %d bytes for %d bytes of input", len(dst), len(src)))
	}
	if inexactOverlap(dst[:len(src)], src) {
		panic("BUG: blockcrypt: output and input overlap other than exactly")
	}
}

// inexactOverlap reports whether x and y share memory at different offsets.
func inexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	xs, ys := uintptr(unsafe.Pointer(&x[0])), uintptr(unsafe.Pointer(&y[0]))
	return xs < ys+uintptr(len(y)) && ys < xs+uintptr(len(x))
}

// encryptUnit encrypts src as one XTS data unit with the raw 16-byte tweak (before its
// encryption with key2), as IEEE P1619 and Wycheproof vectors give it. len(src) must be
// a multiple of 16: LUKS2 sectors always are, so ciphertext stealing is not implemented.
// For known-answer tests.
func (c *Cipher) encryptUnit(dst, src []byte, tweak *[16]byte) {
	c.checkUnit(dst, src)
	c.x.encryptUnit(dst[:len(src)], src, tweak)
}

// decryptUnit is the inverse of encryptUnit.
func (c *Cipher) decryptUnit(dst, src []byte, tweak *[16]byte) {
	c.checkUnit(dst, src)
	c.x.decryptUnit(dst[:len(src)], src, tweak)
}

func (c *Cipher) checkUnit(dst, src []byte) {
	if c.x == nil {
		panic("BUG: blockcrypt: Cipher used after Close")
	}
	if len(src)%16 != 0 {
		panic(fmt.Sprintf("BUG: blockcrypt: data unit of %d bytes is not a multiple of 16 (no ciphertext stealing)", len(src)))
	}
	checkBuffers(dst, src)
}
