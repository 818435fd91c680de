package blockcrypt

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
)

// genericImplementation is the pure-Go XTS. The AES block calls go to crypto/aes, which
// uses AES-NI where the CPU has it (constant-time there; elsewhere Go's own fallback);
// the tweak arithmetic and whitening are plain Go on 64-bit words, without branches or
// tables that depend on key or data.
//
// Why per-block calls: the standard library offers no multi-block primitive that XTS can
// use. Its multi-block assembly (CTR, GCM) encrypts counter blocks, not caller data; CBC
// encryption is serial; CBC decryption could be bent into XTS decryption, but on amd64 it
// is a Go loop over the same single-block function (cbc_noasm.go), and measured no
// faster than the direct calls below. So each 16-byte block costs one Block.Encrypt or
// Block.Decrypt call; what this file optimises is everything around those calls.
var genericImplementation = &implementation{
	name:       "purego",
	available:  true,
	newCrypter: newGeneric,
}

type generic struct {
	k1, k2 cipher.Block
}

func newGeneric(key1, key2 []byte) crypter {
	k1, err := aes.NewCipher(key1)
	if err != nil {
		panic("BUG: blockcrypt: " + err.Error())
	}
	k2, err := aes.NewCipher(key2)
	if err != nil {
		panic("BUG: blockcrypt: " + err.Error())
	}
	return &generic{k1: k1, k2: k2}
}

// wipe drops the block ciphers; crypto/aes offers no way to zero their key schedules.
func (g *generic) wipe() { g.k1, g.k2 = nil, nil }

func (g *generic) encryptSectors(dst, src []byte, sectorSize int, iv uint64) {
	g.sectors(dst, src, sectorSize, iv, false)
}

func (g *generic) decryptSectors(dst, src []byte, sectorSize int, iv uint64) {
	g.sectors(dst, src, sectorSize, iv, true)
}

func (g *generic) sectors(dst, src []byte, sectorSize int, iv uint64, decrypt bool) {
	// The tweak scratch is sized to the sector (Go zeroes a stack array where it is
	// declared, and 4 KiB of zeroing per 512-byte sector would cost a tenth of the time).
	if sectorSize == 512 {
		var tw [512 / 16][2]uint64
		g.sectorsWith(dst, src, sectorSize, iv, decrypt, tw[:])
		clear(tw[:])
	} else {
		var tw [chunkBlocks][2]uint64
		g.sectorsWith(dst, src, sectorSize, iv, decrypt, tw[:])
		clear(tw[:])
	}
}

func (g *generic) sectorsWith(dst, src []byte, sectorSize int, iv uint64, decrypt bool, tw [][2]uint64) {
	step := uint64(sectorSize / 512)
	for off := 0; off < len(src); off += sectorSize {
		d, s := dst[off:off+sectorSize], src[off:off+sectorSize]
		lo, hi := g.tweak(d, s, iv, 0)
		g.unit(d, s, lo, hi, decrypt, tw)
		iv += step
	}
}

func (g *generic) encryptUnit(dst, src []byte, tweak *[16]byte) { g.rawUnit(dst, src, tweak, false) }

func (g *generic) decryptUnit(dst, src []byte, tweak *[16]byte) { g.rawUnit(dst, src, tweak, true) }

// rawUnit en- or decrypts one data unit under a raw 16-byte tweak.
func (g *generic) rawUnit(dst, src []byte, tweak *[16]byte, decrypt bool) {
	if len(src) == 0 {
		return
	}
	le := binary.LittleEndian
	lo, hi := g.tweak(dst, src, le.Uint64(tweak[:8]), le.Uint64(tweak[8:]))
	var tw [chunkBlocks][2]uint64
	g.unit(dst, src, lo, hi, decrypt, tw[:])
	clear(tw[:])
}

// tweak returns the first tweak of a data unit: the little-endian 128-bit value hi:lo
// encrypted with key2. It borrows dst[:16] as the block buffer (a local array handed to
// the cipher.Block interface would escape to the heap, one allocation per sector) and
// puts src's first block there afterwards, so that in-place calls (dst == src) still see
// their input; unit overwrites dst anyway.
func (g *generic) tweak(dst, src []byte, lo, hi uint64) (uint64, uint64) {
	le := binary.LittleEndian
	d, s := (*[16]byte)(dst), (*[16]byte)(src)
	s0, s1 := le.Uint64(s[:8]), le.Uint64(s[8:])
	le.PutUint64(d[:8], lo)
	le.PutUint64(d[8:], hi)
	g.k2.Encrypt(d[:], d[:])
	lo, hi = le.Uint64(d[:8]), le.Uint64(d[8:])
	le.PutUint64(d[:8], s0)
	le.PutUint64(d[8:], s1)
	return lo, hi
}

// chunkBlocks is how many tweaks unit computes ahead at most: one 4096-byte sector.
const chunkBlocks = 256

// unit processes one data unit whose first (encrypted) tweak is hi:lo, in three passes
// per chunk of up to len(tw) blocks (tw is scratch for the tweaks; the caller clears it):
//  1. compute every tweak (doubling in GF(2^128)) and whiten the input into dst;
//  2. the AES calls, in place in dst, in a tight loop;
//  3. whiten dst again.
//
// Doing all three per block in one pass is twice as slow here: the AES assembly loads
// the block with one 16-byte load right after Go stored it as two 8-byte words, which
// defeats store-to-load forwarding; a whole chunk between store and load avoids that.
func (g *generic) unit(dst, src []byte, lo, hi uint64, decrypt bool, tw [][2]uint64) {
	le := binary.LittleEndian
	for len(src) > 0 {
		n := min(len(src)/16, len(tw))
		s, d, t := src[:n*16], dst[:n*16], tw[:n]
		for i := range t {
			sb, db := (*[16]byte)(s[i*16:]), (*[16]byte)(d[i*16:])
			t[i] = [2]uint64{lo, hi}
			le.PutUint64(db[:8], le.Uint64(sb[:8])^lo)
			le.PutUint64(db[8:], le.Uint64(sb[8:])^hi)
			lo, hi = mulAlpha(lo, hi)
		}
		if decrypt {
			for b := d; len(b) >= 16; b = b[16:] {
				g.k1.Decrypt(b, b)
			}
		} else {
			for b := d; len(b) >= 16; b = b[16:] {
				g.k1.Encrypt(b, b)
			}
		}
		for i := range t {
			db := (*[16]byte)(d[i*16:])
			le.PutUint64(db[:8], le.Uint64(db[:8])^t[i][0])
			le.PutUint64(db[8:], le.Uint64(db[8:])^t[i][1])
		}
		src, dst = src[n*16:], dst[n*16:]
	}
}

// mulAlpha multiplies the little-endian 128-bit tweak hi:lo by α (x) in GF(2^128) with
// the IEEE P1619 convention: shift left by one, and if bit 127 fell out, XOR 0x87 into
// the low byte. Constant-time: the reduction is a mask, not a branch.
func mulAlpha(lo, hi uint64) (uint64, uint64) {
	carry := hi >> 63
	hi = hi<<1 | lo>>63
	lo = lo<<1 ^ (0x87 & -carry)
	return lo, hi
}
