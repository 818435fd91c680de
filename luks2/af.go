package luks2

import (
	"crypto/rand"
	"crypto/sha256"
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
	var iv [4]byte
	for j, off := 0, 0; off < len(b); j, off = j+1, off+sha256.Size {
		end := min(off+sha256.Size, len(b))
		d := sha256.New()
		binary.BigEndian.PutUint32(iv[:], uint32(j))
		d.Write(iv[:])
		d.Write(b[off:end])
		var s [sha256.Size]byte
		d.Sum(s[:0])
		copy(b[off:end], s[:])
	}
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
	last := out[(stripes-1)*n:]
	for i := range last {
		last[i] = d[i] ^ key[i]
	}
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

func xorInto(dst, src []byte) {
	for i := range dst {
		dst[i] ^= src[i]
	}
}
