//go:build amd64 && !purego

package blockcrypt

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// asmImpls returns the assembly implementations this CPU runs. The test fails if the CPU
// has AES-NI and AVX (every amd64 CI machine here) but none is available, so that a
// broken feature check cannot turn the differential tests into no-ops, and is skipped,
// visibly, on a CPU without them.
func asmImpls(t testing.TB) []*implementation {
	t.Helper()
	var impls []*implementation
	for _, impl := range asmImplementations {
		if impl.available {
			impls = append(impls, impl)
		}
	}
	if len(impls) == 0 {
		if hasAESNI {
			t.Fatal("the CPU has AES-NI and AVX but no assembly implementation is available")
		}
		t.Skip("this CPU lacks AES-NI with AVX: only the pure-Go implementation runs here")
	}
	return impls
}

// TestAsmSelection checks that NewCipher picks the widest path the CPU has, and that
// every assembly path is registered under its own name and can be forced.
func TestAsmSelection(t *testing.T) {
	want := "purego"
	switch {
	case hasVAES256 && preferYMM:
		want = "vaes256"
	case hasVAES512:
		want = "vaes512"
	case hasVAES256:
		want = "vaes256"
	case hasAESNI:
		want = "aesni"
	}
	if got := bestImplementation().name; got != want {
		t.Errorf("best implementation %s, want %s (features: aesni %v, vaes256 %v, vaes512 %v)",
			got, want, hasAESNI, hasVAES256, hasVAES512)
	}
	for _, impl := range asmImplementations {
		if !slices.Contains(implementations, impl) {
			t.Errorf("%s is not registered", impl.name)
		}
	}
	t.Logf("assembly implementations available here: %v", Implementations())
}

// TestZmmDownclocks checks the CPU signatures of the ymm preference: CPUID leaf 1 EAX
// values of Ice Lake server (family 6, model 0x6a), Tiger Lake (0x8c), Sapphire Rapids
// (0x8f, not listed), AMD Zen 4 (family 0x19, not Intel's family 6) and Skylake-X (0x55).
func TestZmmDownclocks(t *testing.T) {
	for _, c := range []struct {
		eax  uint32
		want bool
	}{
		{0x000606a6, true},  // Ice Lake SP
		{0x000806c1, true},  // Tiger Lake
		{0x00050654, true},  // Skylake-X
		{0x000806f8, false}, // Sapphire Rapids
		{0x00a10f11, false}, // AMD Zen 4 (EPYC 9004)
		{0x000906ea, false}, // Coffee Lake (no AVX-512)
	} {
		if got := zmmDownclocks(c.eax); got != c.want {
			t.Errorf("zmmDownclocks(%#08x) = %v, want %v", c.eax, got, c.want)
		}
	}
	t.Logf("this CPU: prefer ymm %v", preferYMM)
}

// asmCase is one differential comparison: a run of sectors (or a raw data unit) at given
// alignments, in place or not.
type asmCase struct {
	key        []byte
	sectorSize int // 0 for a raw data unit
	sectors    int // sectors in the run, or blocks in the raw unit
	iv         uint64
	tweak      [16]byte
	srcOff     int // misalignment of src (and of dst when not in place)
	dstOff     int
	inPlace    bool
}

func (c asmCase) String() string {
	if c.sectorSize == 0 {
		return fmt.Sprintf("unit of %d blocks, tweak %x, offsets %d/%d, in place %v", c.sectors, c.tweak, c.srcOff, c.dstOff, c.inPlace)
	}
	return fmt.Sprintf("%d sectors of %d, iv %#x, offsets %d/%d, in place %v", c.sectors, c.sectorSize, c.iv, c.srcOff, c.dstOff, c.inPlace)
}

// check runs c under impl and under the pure-Go implementation and compares both
// directions, with guard bytes around the output.
func (c asmCase) check(t testing.TB, impl *implementation, plain []byte) {
	t.Helper()
	n := len(plain)
	ref := mustCipher(t, genericImplementation, c.key)
	asm := mustCipher(t, impl, c.key)
	run := func(ci *Cipher, decrypt bool, dst, src []byte) {
		switch {
		case c.sectorSize == 0 && decrypt:
			ci.decryptUnit(dst, src, &c.tweak)
		case c.sectorSize == 0:
			ci.encryptUnit(dst, src, &c.tweak)
		case decrypt:
			ci.DecryptSectors(dst, src, c.sectorSize, c.iv)
		default:
			ci.EncryptSectors(dst, src, c.sectorSize, c.iv)
		}
	}
	for _, decrypt := range []bool{false, true} {
		want := make([]byte, n)
		run(ref, decrypt, want, plain)

		const guard = 64
		buf := make([]byte, guard+c.srcOff+n+guard+c.dstOff+n+guard)
		for i := range buf {
			buf[i] = 0xA5
		}
		src := buf[guard+c.srcOff : guard+c.srcOff+n]
		dst := src
		if !c.inPlace {
			start := guard + c.srcOff + n + guard + c.dstOff
			dst = buf[start : start+n]
		}
		copy(src, plain)
		run(asm, decrypt, dst, src)
		if !bytes.Equal(dst, want) {
			i := firstDifference(dst, want)
			t.Fatalf("%s: %v: %s differs from purego at byte %d", impl.name, c, direction(decrypt), i)
		}
		if !c.inPlace && !bytes.Equal(src, plain) {
			t.Fatalf("%s: %v: %s modified its input", impl.name, c, direction(decrypt))
		}
		// Everything outside src and dst must be untouched.
		for i := range buf {
			inSrc := i >= guard+c.srcOff && i < guard+c.srcOff+n
			dstStart := guard + c.srcOff + n + guard + c.dstOff
			inDst := !c.inPlace && i >= dstStart && i < dstStart+n
			if !inSrc && !inDst && buf[i] != 0xA5 {
				t.Fatalf("%s: %v: %s wrote outside its buffers (byte %d of the arena)", impl.name, c, direction(decrypt), i)
			}
		}
	}
}

func direction(decrypt bool) string {
	if decrypt {
		return "decrypt"
	}
	return "encrypt"
}

// randomAsmCase draws a case; run lengths cross the 8-sector tweak batches of the
// kernels, raw units cover every block count up to 80 (each kernel's group size and
// remainder).
func randomAsmCase(rng *rand.Rand) asmCase {
	c := asmCase{
		key:     randomKey(rng),
		srcOff:  rng.IntN(64),
		dstOff:  rng.IntN(64),
		inPlace: rng.IntN(3) == 0,
		iv:      rng.Uint64(),
	}
	if rng.IntN(4) == 0 {
		c.iv = ^uint64(0) - uint64(rng.IntN(100)) // the 64-bit IV wraps inside the run
	}
	binary.LittleEndian.PutUint64(c.tweak[:8], rng.Uint64())
	binary.LittleEndian.PutUint64(c.tweak[8:], rng.Uint64())
	switch rng.IntN(4) {
	case 0:
		c.sectorSize, c.sectors = 512, 1+rng.IntN(40)
	case 1:
		c.sectorSize, c.sectors = 4096, 1+rng.IntN(20)
	case 2:
		c.sectorSize, c.sectors = []int{512, 4096}[rng.IntN(2)], 1
	default:
		c.sectorSize, c.sectors = 0, 1+rng.IntN(80)
	}
	return c
}

func (c asmCase) length() int {
	if c.sectorSize == 0 {
		return 16 * c.sectors
	}
	return c.sectorSize * c.sectors
}

// TestAsmDifferential compares every assembly implementation with the pure-Go one on
// random keys, IVs (including 64-bit wrap-around), run lengths, raw data units of every
// block count, misaligned buffers, in place and out of place.
func TestAsmDifferential(t *testing.T) {
	for _, impl := range asmImpls(t) {
		t.Run(impl.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(11, 12))
			for range 300 {
				c := randomAsmCase(rng)
				plain := make([]byte, c.length())
				fillRandom(rng, plain)
				c.check(t, impl, plain)
			}
			// Every raw unit length from 1 to 80 blocks, so that each group size and
			// every remainder of the one-block tail is hit in both directions.
			for blocks := 1; blocks <= 80; blocks++ {
				c := randomAsmCase(rng)
				c.sectorSize, c.sectors = 0, blocks
				plain := make([]byte, c.length())
				fillRandom(rng, plain)
				c.check(t, impl, plain)
			}
		})
	}
}

// TestAsmLongRun encrypts a 1 MiB request (what one NBD write becomes) as one call and
// compares it with the pure-Go path sector by sector.
func TestAsmLongRun(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	plain := make([]byte, 1<<20)
	fillRandom(rng, plain)
	key := randomKey(rng)
	for _, impl := range asmImpls(t) {
		for _, ss := range []int{512, 4096} {
			c := asmCase{key: key, sectorSize: ss, sectors: len(plain) / ss, iv: rng.Uint64(), srcOff: 3, dstOff: 5}
			c.check(t, impl, plain)
		}
	}
}

// TestAsmGuardPages puts the input and output against PROT_NONE pages on both sides, so
// that a read or write of even one byte outside the slices faults.
func TestAsmGuardPages(t *testing.T) {
	page := unix.Getpagesize()
	guarded := func(n int) []byte {
		pages := (n + page - 1) / page
		mem, err := unix.Mmap(-1, 0, (pages+2)*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Munmap(mem) })
		if err := unix.Mprotect(mem[:page], unix.PROT_NONE); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mprotect(mem[(pages+1)*page:], unix.PROT_NONE); err != nil {
			t.Fatal(err)
		}
		return mem[page : (pages+1)*page]
	}
	rng := rand.New(rand.NewPCG(15, 16))
	for _, impl := range asmImpls(t) {
		c := mustCipher(t, impl, randomKey(rng))
		for _, n := range []int{512, 4096, 3 * 4096, 16, 48, 16 * 17} {
			in, out := guarded(n), guarded(n)
			// At the end of the mapping (a fault past the end) and at its start.
			for _, pos := range []int{len(in) - n, 0} {
				src, dst := in[pos:pos+n], out[pos:pos+n]
				fillRandom(rng, src)
				var tw [16]byte
				switch {
				case n%4096 == 0:
					c.EncryptSectors(dst, src, 4096, 7)
					c.DecryptSectors(dst, dst, 4096, 7)
				case n%512 == 0:
					c.EncryptSectors(dst, src, 512, 7)
					c.DecryptSectors(dst, dst, 512, 7)
				default:
					c.encryptUnit(dst, src, &tw)
					c.decryptUnit(dst, dst, &tw)
				}
				if !bytes.Equal(dst, src) {
					t.Fatalf("%s: %d bytes at page offset %d: round trip failed", impl.name, n, pos)
				}
			}
		}
	}
}

// TestAsmWipe checks that Close zeroes the expanded keys of the assembly paths.
func TestAsmWipe(t *testing.T) {
	for _, impl := range asmImpls(t) {
		c, err := newCipherWith(impl, testKey(5))
		if err != nil {
			t.Fatal(err)
		}
		x := c.x.(*asmCrypter)
		if !slices.ContainsFunc(x.mem, func(b byte) bool { return b != 0 }) {
			t.Fatalf("%s: no key schedule before Close", impl.name)
		}
		c.Close()
		if slices.ContainsFunc(x.mem, func(b byte) bool { return b != 0 }) {
			t.Fatalf("%s: key schedule not zeroed by Close", impl.name)
		}
		if x.ks != nil {
			t.Fatalf("%s: schedule pointer kept after Close", impl.name)
		}
	}
}

// TestExpandKeyAsm checks the assembly key schedule against the FIPS-197 key expansion
// written out in Go (S-box computed, not tabulated), round key by round key, and the
// decryption schedule against InvMixColumns of it.
func TestExpandKeyAsm(t *testing.T) {
	if !hasAESNI {
		t.Skip("no AES-NI")
	}
	rng := rand.New(rand.NewPCG(17, 18))
	for range 20 {
		var key [32]byte
		fillRandom(rng, key[:])
		var enc, dec [ksScheduleSz]byte
		expandKeyAsm(&key, &enc, &dec)
		var encOnly [ksScheduleSz]byte
		expandKeyAsm(&key, &encOnly, nil) // the tweak key's form: no decryption schedule
		if encOnly != enc {
			t.Fatalf("key %x: the schedule without decryption keys differs", key)
		}
		want := referenceExpand(key)
		for r := range 15 {
			for copyN := range 4 {
				got := enc[r*ksSlot+16*copyN : r*ksSlot+16*copyN+16]
				if !bytes.Equal(got, want[r][:]) {
					t.Fatalf("key %x: encryption round key %d copy %d = %x, want %x", key, r, copyN, got, want[r])
				}
			}
			wantDec := want[14-r]
			if r != 0 && r != 14 {
				wantDec = invMixColumns(wantDec)
			}
			if got := dec[r*ksSlot : r*ksSlot+16]; !bytes.Equal(got, wantDec[:]) {
				t.Fatalf("key %x: decryption round key %d = %x, want %x", key, r, got, wantDec)
			}
		}
	}
}

// referenceExpand is the AES-256 key expansion of FIPS-197 §5.2, for the test only.
func referenceExpand(key [32]byte) [15][16]byte {
	var w [60]uint32
	for i := range 8 {
		w[i] = binary.BigEndian.Uint32(key[4*i:])
	}
	rcon := uint32(1)
	for i := 8; i < 60; i++ {
		t := w[i-1]
		switch i % 8 {
		case 0:
			t = subWord(t<<8|t>>24) ^ rcon<<24
			rcon = uint32(gfMul(byte(rcon), 2))
		case 4:
			t = subWord(t)
		}
		w[i] = w[i-8] ^ t
	}
	var rk [15][16]byte
	for i := range 60 {
		binary.BigEndian.PutUint32(rk[i/4][4*(i%4):], w[i])
	}
	return rk
}

func subWord(w uint32) uint32 {
	return uint32(sbox(byte(w>>24)))<<24 | uint32(sbox(byte(w>>16)))<<16 | uint32(sbox(byte(w>>8)))<<8 | uint32(sbox(byte(w)))
}

// gfMul multiplies in GF(2^8) with the AES polynomial.
func gfMul(a, b byte) byte {
	var p byte
	for b != 0 {
		if b&1 != 0 {
			p ^= a
		}
		hi := a & 0x80
		a <<= 1
		if hi != 0 {
			a ^= 0x1b
		}
		b >>= 1
	}
	return p
}

// sbox computes the AES S-box: the inverse in GF(2^8) followed by the affine map.
func sbox(x byte) byte {
	var inv byte
	for y := 1; y < 256 && x != 0; y++ {
		if gfMul(x, byte(y)) == 1 {
			inv = byte(y)
			break
		}
	}
	s := inv
	for i := 1; i <= 4; i++ {
		s ^= inv<<i | inv>>(8-i)
	}
	return s ^ 0x63
}

func invMixColumns(k [16]byte) [16]byte {
	var out [16]byte
	for c := range 4 {
		a := k[4*c : 4*c+4]
		for r := range 4 {
			out[4*c+r] = gfMul(a[r], 14) ^ gfMul(a[(r+1)%4], 11) ^ gfMul(a[(r+2)%4], 13) ^ gfMul(a[(r+3)%4], 9)
		}
	}
	return out
}

// FuzzAsmDifferential compares every assembly implementation with the pure-Go one on
// inputs the fuzzer chooses: key, IV or raw tweak, sector size, run length, alignment,
// aliasing and data.
func FuzzAsmDifferential(f *testing.F) {
	f.Add(bytes.Repeat([]byte{1, 2}, 32), uint64(0), uint8(0), uint8(1), uint8(0), uint8(0), false, []byte("seed"))
	f.Add(bytes.Repeat([]byte{3, 4, 5}, 22), ^uint64(0), uint8(1), uint8(9), uint8(3), uint8(17), true, []byte{0xff})
	f.Add(bytes.Repeat([]byte{7}, 63), uint64(1<<40), uint8(2), uint8(33), uint8(1), uint8(62), false, []byte{})
	impls := asmImpls(f)
	f.Fuzz(func(t *testing.T, key []byte, iv uint64, mode, count, srcOff, dstOff uint8, inPlace bool, data []byte) {
		if len(key) < KeySize {
			key = append(key, make([]byte, KeySize-len(key))...)
		}
		key = key[:KeySize]
		if bytes.Equal(key[:32], key[32:]) {
			key[0] ^= 1
		}
		c := asmCase{key: key, iv: iv, srcOff: int(srcOff % 64), dstOff: int(dstOff % 64), inPlace: inPlace}
		binary.LittleEndian.PutUint64(c.tweak[:8], iv)
		binary.LittleEndian.PutUint64(c.tweak[8:], iv*0x9E3779B97F4A7C15)
		switch mode % 3 {
		case 0:
			c.sectorSize, c.sectors = 512, 1+int(count)%40
		case 1:
			c.sectorSize, c.sectors = 4096, 1+int(count)%12
		default:
			c.sectorSize, c.sectors = 0, 1+int(count)%100
		}
		plain := make([]byte, c.length())
		// Spread the fuzzer's bytes over the whole input (a counter where they run out).
		for i := range plain {
			if len(data) > 0 {
				plain[i] = data[i%len(data)] ^ byte(i/len(data))
			} else {
				plain[i] = byte(i)
			}
		}
		for _, impl := range impls {
			c.check(t, impl, plain)
		}
	})
}
