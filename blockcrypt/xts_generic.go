package blockcrypt

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
)

// genericImplementation is the pure-Go XTS: the AES block calls go to crypto/aes (which
// itself uses AES-NI where the CPU has it, and is constant-time there); the tweak
// arithmetic and whitening are plain Go on 64-bit words.
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
	step := uint64(sectorSize / 512)
	var t [16]byte
	for off := 0; off < len(src); off += sectorSize {
		binary.LittleEndian.PutUint64(t[:8], iv)
		clear(t[8:])
		g.k2.Encrypt(t[:], t[:])
		g.unit(dst[off:off+sectorSize], src[off:off+sectorSize], &t, decrypt)
		iv += step
	}
}

func (g *generic) encryptUnit(dst, src []byte, tweak *[16]byte) {
	var t [16]byte
	g.k2.Encrypt(t[:], tweak[:])
	g.unit(dst, src, &t, false)
}

func (g *generic) decryptUnit(dst, src []byte, tweak *[16]byte) {
	var t [16]byte
	g.k2.Encrypt(t[:], tweak[:])
	g.unit(dst, src, &t, true)
}

// chunkBlocks is how many tweaks unit computes ahead: one 4096-byte sector.
const chunkBlocks = 256

// unit processes one data unit whose encrypted tweak is t, in three passes per chunk:
// all tweaks first (doubling in GF(2^128)), whitening in 64-bit words, the block calls,
// and whitening again.
func (g *generic) unit(dst, src []byte, t *[16]byte, decrypt bool) {
	lo := binary.LittleEndian.Uint64(t[:8])
	hi := binary.LittleEndian.Uint64(t[8:])
	var tw [chunkBlocks][2]uint64
	for len(src) > 0 {
		n := min(len(src)/16, chunkBlocks)
		for i := range n {
			tw[i] = [2]uint64{lo, hi}
			lo, hi = mulAlpha(lo, hi)
		}
		for i := range n {
			b := i * 16
			binary.LittleEndian.PutUint64(dst[b:], binary.LittleEndian.Uint64(src[b:])^tw[i][0])
			binary.LittleEndian.PutUint64(dst[b+8:], binary.LittleEndian.Uint64(src[b+8:])^tw[i][1])
		}
		if decrypt {
			for i := range n {
				b := dst[i*16 : i*16+16]
				g.k1.Decrypt(b, b)
			}
		} else {
			for i := range n {
				b := dst[i*16 : i*16+16]
				g.k1.Encrypt(b, b)
			}
		}
		for i := range n {
			b := i * 16
			binary.LittleEndian.PutUint64(dst[b:], binary.LittleEndian.Uint64(dst[b:])^tw[i][0])
			binary.LittleEndian.PutUint64(dst[b+8:], binary.LittleEndian.Uint64(dst[b+8:])^tw[i][1])
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
