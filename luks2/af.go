package luks2

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
)

// Anti-forensic splitter of LUKS1 (specification §2.4 of LUKS1; TKS1), with SHA-256.

// afAreaSize is the size of the split key material of a key, rounded up to whole
// 512-byte sectors as it is encrypted in the keyslot area.
func afAreaSize(keySize int) int64 {
	n := int64(keySize) * Stripes
	return (n + 511) &^ 511
}

// diffuse replaces b with its diffusion: each digest-sized block j is replaced by
// SHA-256(be32(j) || block), the last block truncated to its length.
func diffuse(b []byte) {
	var buf [4 + sha256.Size]byte
	for j, off := 0, 0; off < len(b); j, off = j+1, off+sha256.Size {
		end := min(off+sha256.Size, len(b))
		binary.BigEndian.PutUint32(buf[:4], uint32(j))
		n := copy(buf[4:], b[off:end])
		sum := sha256.Sum256(buf[:4+n])
		copy(b[off:end], sum[:])
	}
	clear(buf[:])
}

// afSplit returns the split material of key over stripes stripes.
func afSplit(key []byte, stripes int) []byte {
	n := len(key)
	out := make([]byte, n*stripes)
	rand.Read(out[:n*(stripes-1)])
	d := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		xorInto(d, out[i*n:(i+1)*n])
		diffuse(d)
	}
	subtle.XORBytes(out[(stripes-1)*n:], d, key)
	clear(d)
	return out
}

// afMerge recovers a key of keySize bytes from split material.
func afMerge(material []byte, keySize, stripes int) []byte {
	if len(material) < keySize*stripes {
		panic(fmt.Sprintf("BUG: luks2: %d bytes of split material for %d stripes of %d", len(material), stripes, keySize))
	}
	d := make([]byte, keySize)
	for i := 0; i < stripes-1; i++ {
		xorInto(d, material[i*keySize:(i+1)*keySize])
		diffuse(d)
	}
	xorInto(d, material[(stripes-1)*keySize:stripes*keySize])
	return d
}

func xorInto(dst, src []byte) { subtle.XORBytes(dst, dst, src) }
