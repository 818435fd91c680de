// Command _asm generates blockcrypt/xts_amd64.s and its Go declarations
// (blockcrypt/xts_stubs_amd64.go) with avo. It lives in its own module so that avo never
// enters atrest's go.mod, as crypto/internal/fips140/aes/_asm does in the Go tree.
//
// Regenerate with `go generate ./blockcrypt` from the repository root (the go:generate
// line in blockcrypt/xts_amd64.go), or from this directory with:
//
//	go run . -out ../xts_amd64.s -stubs ../xts_stubs_amd64.go -pkg blockcrypt
//
// # Design
//
// One XTS kernel is generated per shape and direction. A shape fixes W, the AES blocks
// per vector register (1 for xmm, 2 for ymm, 4 for zmm), ND, the data registers of a
// group (so B = W*ND blocks are in flight), and whether the 15 round keys of key1 sit in
// registers 16..30 (AVX-512 only) or are read as memory operands. The key schedule
// stores every round key four times in a row (a 64-byte slot), so a 16-, 32- or 64-byte
// load of it is already a broadcast; expandKeyAsm builds it with AESKEYGENASSIST and
// AESIMC, without tables.
//
// A kernel takes a run of data units (sectors) of unitBytes each; unit k's tweak is
// E_key2(raw + k*step). In a run of several units the raw tweaks of 8 units are
// encrypted together (8 independent AES chains) into a stack buffer; a lone unit
// encrypts its own, the latency being unavoidable there.
//
// In the group loop D[i] holds data and TW[i] the tweaks of those blocks, so the
// 16-register shapes keep 8 data and 8 tweak registers and nothing else. Round 0 XORs
// the source with K0 before the tweak, so that one XOR waits for the tweak; where
// registers are spare (the zmm shape) the last round uses K14 XOR tweak, which does the
// final whitening in AESENCLAST, and the next group's tweaks are computed while the
// rounds run (6% faster); otherwise after the group is stored. Each tweak register is
// multiplied by x^B: for B a multiple of 8 that is a byte shift of each 128-bit lane
// plus one carry-less multiplication of the bits shifted out by 0x87 (mulXBytes; no
// table, no branch). The tweaks of a
// unit's first group are derived from E_key2(raw) by multiplying it by x^k, k < 64, with
// 64-bit shifts (per-lane counts for ymm and zmm) and the same reduction, all in
// parallel.
//
// A data unit whose length is not a multiple of 16*B (only the raw-tweak known-answer
// entry point sees those) ends with a one-block-at-a-time loop on the low lane of TW[0].
//
// The xmm shape advances its tweaks by doubling instead (mulX, as in the IEEE P1619
// reference), which needs two shuffle or shift operations per tweak where mulXBytes
// needs three, one a carry-less multiplication: 8% faster at 64 KiB on Zen 4, where
// these operations seem to take issue slots from AESENC (with the tweak update left
// out, as an experiment, every shape ran 7-15% faster).
//
// Shapes measured on AMD Zen 4 and dropped: ymm with the keys in AVX-512VL registers
// (B=16) and zmm with 8 data registers (B=32) were 5-10% slower than the zmm shape
// kept; xmm with 16 blocks in flight (AVX-512 registers) was no faster than 8.
package main

import (
	"fmt"

	. "github.com/mmcloughlin/avo/build"
	. "github.com/mmcloughlin/avo/operand"
	. "github.com/mmcloughlin/avo/reg"
)

//go:generate go run . -out ../xts_amd64.s -stubs ../xts_stubs_amd64.go -pkg blockcrypt

// Layout of the key schedule (must match the ks constants in xts_amd64.go): three schedules
// of 15 round keys, each round key stored 4 times (64 bytes).
const (
	slot      = 64
	offEnc1   = 0
	offDec1   = 15 * slot
	offEnc2   = 30 * slot
	schedSize = 45 * slot
)

type shape struct {
	name     string // function name suffix
	w        int    // blocks per register: 1 (xmm), 2 (ymm), 4 (zmm)
	nd       int    // data registers per group
	resident bool   // round keys of key1 in registers 16..30 (AVX-512 only)
	doc      string
}

var shapes = []shape{
	{"AESNI", 1, 8, false, "AES-NI and PCLMULQDQ in VEX (AVX) form on xmm, 8 blocks per group, round keys as memory operands."},
	{"VAES256", 2, 8, false, "VAES and VPCLMULQDQ on ymm with AVX2 only (16 registers), 16 blocks per group, round keys as memory operands."},
	{"VAES512", 4, 4, true, "VAES and VPCLMULQDQ on zmm (AVX-512), 16 blocks per group, round keys in registers."},
}

func main() {
	ConstraintExpr("!purego")
	poly := polyConst()
	carry := carryConst()
	carryMask = func() Mem { return carry }
	expandKey()
	cpuid()
	for _, s := range shapes {
		kernel(s, false, poly)
		kernel(s, true, poly)
	}
	Generate()
}

// polyConst is 0x87 in the low quadword of each 128-bit lane of a 512-bit constant: the
// reduction of x^128 = x^7 + x^2 + x + 1 in the IEEE P1619 bit order.
func polyConst() Mem {
	m := GLOBL("xtsPoly", RODATA|NOPTR)
	for i := 0; i < 4; i++ {
		DATA(16*i, U64(0x87))
		DATA(16*i+8, U64(0))
	}
	return m
}

func cpuid() {
	TEXT("cpuid", NOSPLIT, "func(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)")
	Doc("cpuid executes the CPUID instruction with the given leaf and subleaf.")
	Load(Param("eaxArg"), EAX)
	Load(Param("ecxArg"), ECX)
	CPUID()
	Store(EAX, Return("eax"))
	Store(EBX, Return("ebx"))
	Store(ECX, Return("ecx"))
	Store(EDX, Return("edx"))
	RET()
}

// expandKey generates the AES-256 key expansion with AESKEYGENASSIST (no table lookups)
// and the decryption schedule of the equivalent inverse cipher with AESIMC, each round
// key written four times (a 64-byte slot).
func expandKey() {
	TEXT("expandKeyAsm", NOSPLIT, "func(key *[32]byte, enc, dec *[15 * 64]byte)")
	Pragma("noescape")
	Doc("expandKeyAsm expands an AES-256 key into the encryption and decryption",
		"schedules, each round key stored four times; dec may be nil (the tweak key",
		"needs no decryption schedule). Needs AES-NI only.")
	key := Load(Param("key"), GP64())
	enc := Load(Param("enc"), GP64())
	dec := Load(Param("dec"), GP64())

	store := func(x Op, base Register, i int) {
		for j := 0; j < 4; j++ {
			MOVOU(x, Mem{Base: base, Disp: i*slot + 16*j})
		}
	}
	// next computes prev ^ (prev<<32) ^ (prev<<64) ^ (prev<<96) ^ t, in prev.
	next := func(prev, t, tmp Register) {
		MOVO(prev, tmp)
		for j := 0; j < 3; j++ {
			PSLLDQ(Imm(4), tmp)
			PXOR(tmp, prev)
		}
		PXOR(t, prev)
	}
	MOVOU(Mem{Base: key}, X0)
	MOVOU(Mem{Base: key, Disp: 16}, X1)
	store(X0, enc, 0)
	store(X1, enc, 1)
	rcon := []uint64{0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40}
	for i := 1; i <= 7; i++ {
		AESKEYGENASSIST(Imm(rcon[i-1]), X1, X2)
		PSHUFD(Imm(0xff), X2, X2)
		next(X0, X2, X3)
		store(X0, enc, 2*i)
		if i < 7 {
			AESKEYGENASSIST(Imm(0), X0, X2)
			PSHUFD(Imm(0xaa), X2, X2)
			next(X1, X2, X3)
			store(X1, enc, 2*i+1)
		}
	}
	// Decryption: dec[0] = enc[14], dec[i] = InvMixColumns(enc[14-i]), dec[14] = enc[0].
	TESTQ(dec, dec)
	JZ(LabelRef("expandKeyAsm_done"))
	MOVOU(Mem{Base: enc, Disp: 14 * slot}, X0)
	store(X0, dec, 0)
	for i := 1; i < 14; i++ {
		MOVOU(Mem{Base: enc, Disp: (14 - i) * slot}, X0)
		AESIMC(X0, X0)
		store(X0, dec, i)
	}
	MOVOU(Mem{Base: enc}, X0)
	store(X0, dec, 14)
	Label("expandKeyAsm_done")
	// Leave no key material in the registers used.
	for _, x := range []Register{X0, X1, X2, X3} {
		PXOR(x, x)
	}
	RET()
}

// vec returns vector register n in the width of the shape.
func (s shape) vec(n int) VecPhysical {
	x := []VecPhysical{X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, X10, X11, X12, X13, X14, X15,
		X16, X17, X18, X19, X20, X21, X22, X23, X24, X25, X26, X27, X28, X29, X30, X31}[n]
	switch s.w {
	case 1:
		return x
	case 2:
		return x.AsY().(VecPhysical)
	default:
		return x.AsZ().(VecPhysical)
	}
}

func xmm(r Op) VecPhysical { return r.(VecPhysical).AsX().(VecPhysical) }

// evex reports whether an instruction on these operands needs the EVEX encoding.
func evex(ops ...Op) bool {
	for _, op := range ops {
		if r, ok := op.(VecPhysical); ok {
			if r.Size() == 64 || r.PhysicalIndex() >= 16 {
				return true
			}
		}
	}
	return false
}

// vxor is dst = a ^ b (a may be memory).
func vxor(a, b, dst Op) {
	if evex(a, b, dst) {
		VPXORQ(a, b, dst)
	} else {
		VPXOR(a, b, dst)
	}
}

func vload(m, dst Op) {
	if evex(dst) {
		VMOVDQU64(m, dst)
	} else {
		VMOVDQU(m, dst)
	}
}

func vstore(src, m Op) {
	if evex(src) {
		VMOVDQU64(src, m)
	} else {
		VMOVDQU(src, m)
	}
}

func vmov(src, dst Op) {
	if evex(src, dst) {
		VMOVDQA64(src, dst)
	} else {
		VMOVDQA(src, dst)
	}
}

// mulXk sets dst = src * x^k in GF(2^128) in every 128-bit lane, for 0 < k < 64, with
// t1 and t2 as scratch (distinct from src and dst; dst may equal src).
func mulXk(dst, src Op, k int, t1, t2 Op, poly Mem) {
	VPSRLQ(Imm(uint64(64-k)), src, t1) // bits shifted out of each quadword
	VPSLLQ(Imm(uint64(k)), src, dst)
	VPSLLDQ(Imm(8), t1, t2)             // low quadword's carry into the high one
	VPCLMULQDQ(Imm(0x01), poly, t1, t1) // high quadword's carry, reduced by 0x87
	xor3(t1, t2, dst)
}

// mulXVar sets dst = src * x^k in GF(2^128) where k (< 64) may differ from lane to lane:
// the quadwords of cl hold k and those of cr 64-k.
func mulXVar(dst, src Op, cl, cr Mem, t1, t2 Op, poly Mem) {
	VPSRLVQ(cr, src, t1)
	VPSLLVQ(cl, src, dst)
	VPSLLDQ(Imm(8), t1, t2)
	VPCLMULQDQ(Imm(0x01), poly, t1, t1)
	xor3(t1, t2, dst)
}

// xor3 is dst ^= a ^ b.
func xor3(a, b, dst Op) {
	if evex(a, b, dst) {
		VPTERNLOGQ(Imm(0x96), a, b, dst)
	} else {
		vxor(a, dst, dst)
		vxor(b, dst, dst)
	}
}

var shiftTables = map[int][2]Mem{}

// shiftCounts returns two tables of 8 rows of 64 bytes: row j holds, for each lane l of
// a register of w lanes, the count k = w*j+l (cl) and 64-k (cr) in both quadwords.
func shiftCounts(w int) (cl, cr Mem) {
	if t, ok := shiftTables[w]; ok {
		return t[0], t[1]
	}
	cl = GLOBL(fmt.Sprintf("xtsShiftL%d", w), RODATA|NOPTR)
	for j := 0; j < 8; j++ {
		for q := 0; q < 8; q++ {
			DATA(64*j+8*q, U64(uint64(w*j+(q/2)%w)))
		}
	}
	cr = GLOBL(fmt.Sprintf("xtsShiftR%d", w), RODATA|NOPTR)
	for j := 0; j < 8; j++ {
		for q := 0; q < 8; q++ {
			DATA(64*j+8*q, U64(uint64(64-(w*j+(q/2)%w))))
		}
	}
	shiftTables[w] = [2]Mem{cl, cr}
	return cl, cr
}

// mulX sets dst = src * x in GF(2^128) (one 128-bit lane) with tmp as scratch: both
// quadwords shift left by one, the bit leaving the low one enters the high one, and the
// bit leaving the high one is reduced with 0x87. The carries become masks by an
// arithmetic shift of the sign dwords, so there is no branch and no table.
func mulX(dst, src, tmp Op) {
	VPSHUFD(Imm(0x13), src, tmp) // dword 0 = src dword 3, dword 2 = src dword 1
	VPSRAD(Imm(31), tmp, tmp)
	VPAND(carryMask(), tmp, tmp) // 0x87 if bit 127 was set, 1<<64 if bit 63 was
	VPADDQ(src, src, dst)
	VPXOR(tmp, dst, dst)
}

// carryMask is the 128-bit constant {0x87, 1} (low, high quadword), made by main.
var carryMask func() Mem

func carryConst() Mem {
	m := GLOBL("xtsCarry", RODATA|NOPTR)
	DATA(0, U64(0x87))
	DATA(8, U64(1))
	return m
}

// mulXBytes sets t = t * x^(8*n) in every 128-bit lane, for n <= 7, with tmp as scratch.
func mulXBytes(t Op, n int, tmp Op, poly Mem) {
	VPSRLDQ(Imm(uint64(16-n)), t, tmp) // the top n bytes, at the bottom
	VPSLLDQ(Imm(uint64(n)), t, t)
	VPCLMULQDQ(Imm(0x00), poly, tmp, tmp)
	vxor(tmp, t, t)
}

func kernel(s shape, decrypt bool, poly Mem) {
	dir := "Enc"
	if decrypt {
		dir = "Dec"
	}
	name := fmt.Sprintf("xts%s%s", dir, s.name)
	TEXT(name, NOSPLIT, "func(ks *byte, dst, src []byte, unitBytes int, tweak *[16]byte, step uint64)")
	Pragma("noescape")
	Doc(fmt.Sprintf("%s %ss src into dst as len(src)/unitBytes consecutive XTS data units.", name, map[bool]string{false: "encrypt", true: "decrypt"}[decrypt]),
		"Unit k's tweak is E_key2(tweak + k*step), step added to the low 64 bits mod 2^64.",
		"The caller guarantees: len(src) > 0, unitBytes > 0, unitBytes%16 == 0,",
		"len(src)%unitBytes == 0, len(dst) >= len(src); ks is a schedule from expandKeyAsm.",
		s.doc)

	ks := Load(Param("ks"), GP64())
	dst := Load(Param("dst").Base(), GP64())
	src := Load(Param("src").Base(), GP64())
	n := Load(Param("src").Len(), GP64())
	unit := Load(Param("unitBytes"), GP64())
	tp := Load(Param("tweak"), GP64())
	step := Load(Param("step"), GP64())
	rawlo, rawhi := GP64(), GP64()
	MOVQ(Mem{Base: tp}, rawlo)
	MOVQ(Mem{Base: tp, Disp: 8}, rawhi)
	m := GP64()

	B := s.w * s.nd
	groupBytes := 16 * B
	off1 := offEnc1
	if decrypt {
		off1 = offDec1
	}
	D := make([]VecPhysical, s.nd)
	TW := make([]VecPhysical, s.nd)
	for i := range D {
		D[i] = s.vec(i)
		TW[i] = s.vec(s.nd + i)
	}
	key := func(r int) Op {
		if s.resident {
			return s.vec(16 + r)
		}
		return Mem{Base: ks, Disp: off1 + r*slot}
	}
	keyX := func(r int) Op {
		if s.resident {
			return xmm(s.vec(16 + r))
		}
		return Mem{Base: ks, Disp: off1 + r*slot}
	}
	enc, encLast := VAESENC, VAESENCLAST
	if decrypt {
		enc, encLast = VAESDEC, VAESDECLAST
	}

	if s.resident {
		Comment("Round keys of key1, loaded once per call.")
		for r := 0; r < 15; r++ {
			vload(Mem{Base: ks, Disp: off1 + r*slot}, s.vec(16+r))
		}
	}

	// Tweaks of several units are encrypted 8 at a time into a stack buffer, so that
	// their AES latency overlaps; a lone unit (or the last one) does its own.
	batch := AllocLocal(8 * 16)
	bi := GP64() // byte offset of the next unused tweak in batch; 128 when empty
	MOVQ(U32(128), bi)
	k2 := func(r int) Mem { return Mem{Base: ks, Disp: offEnc2 + r*slot} }

	Label(name + "_unit")
	CMPQ(bi, U32(128))
	JB(LabelRef(name + "_batched"))
	CMPQ(n, unit)
	JE(LabelRef(name + "_lone"))

	Comment("E_key2 of the raw tweaks of the next 8 units.")
	lo := GP64()
	MOVQ(rawlo, lo)
	for k := 0; k < 8; k++ {
		MOVQ(lo, batch.Offset(16*k))
		MOVQ(rawhi, batch.Offset(16*k+8))
		if k < 7 {
			ADDQ(step, lo)
		}
	}
	tv := make([]VecPhysical, 8/s.w)
	for i := range tv {
		tv[i] = s.vec(i)
		vload(batch.Offset(16*s.w*i), tv[i])
		vxor(k2(0), tv[i], tv[i])
	}
	for r := 1; r < 14; r++ {
		for i := range tv {
			VAESENC(k2(r), tv[i], tv[i])
		}
	}
	for i := range tv {
		VAESENCLAST(k2(14), tv[i], tv[i])
		vstore(tv[i], batch.Offset(16*s.w*i))
	}
	XORQ(bi, bi)

	Label(name + "_batched")
	VMOVDQU(batch.Idx(bi, 1), X0)
	ADDQ(Imm(16), bi)
	JMP(LabelRef(name + "_tweak"))

	Label(name + "_lone")
	Comment("Tweak of a lone unit: E_key2(raw).")
	t0 := X0
	VMOVQ(rawlo, t0)
	VPINSRQ(Imm(1), rawhi, t0, t0)
	VPXOR(k2(0), t0, t0)
	for r := 1; r < 14; r++ {
		VAESENC(k2(r), t0, t0)
	}
	VAESENCLAST(k2(14), t0, t0)

	Label(name + "_tweak")
	ADDQ(step, rawlo)

	Comment(fmt.Sprintf("Tweaks of the first group: lane l of TW[j] is T*x^(%d*j+l).", s.w))
	if s.w == 1 {
		for j := 1; j < s.nd; j++ {
			mulXk(TW[j], X0, j, X1, X2, poly)
		}
		vmov(X0, TW[0])
	} else {
		// Broadcast T to every lane, then shift each lane by its own count.
		if s.w == 2 {
			VINSERTI128(Imm(1), X0, Y0, Y0)
		} else {
			VSHUFI64X2(Imm(0), Z0, Z0, Z0)
		}
		cl, cr := shiftCounts(s.w)
		for j := 0; j < s.nd; j++ {
			mulXVar(TW[j], s.vec(0), cl.Offset(64*j), cr.Offset(64*j), s.vec(1), s.vec(2), poly)
		}
	}

	MOVQ(unit, m)
	Label(name + "_group")
	CMPQ(m, U32(groupBytes))
	JB(LabelRef(name + "_tail"))
	// Whitening and round 0: src ^ K0 first, so that only one XOR waits for the tweak.
	for i := range D {
		if s.resident {
			vxor(Mem{Base: src, Disp: 16 * s.w * i}, key(0), D[i])
		} else {
			vload(Mem{Base: src, Disp: 16 * s.w * i}, D[i])
			vxor(key(0), D[i], D[i])
		}
		vxor(TW[i], D[i], D[i])
	}
	if lastK := 2 * s.nd; s.resident && lastK+2*s.nd <= 16 {
		// Spare registers: the last round key XOR the tweak, so that AESENCLAST does the
		// final whitening, computed before the rounds; the tweaks for the next group are
		// then computed while the rounds run (in registers lastK+nd.., free here).
		for i := range D {
			vxor(key(14), TW[i], s.vec(lastK+i))
		}
		for r := 1; r < 14; r++ {
			for i := range D {
				enc(key(r), D[i], D[i])
			}
			if r <= len(D) {
				i := r - 1
				mulXBytes(TW[i], B/8, s.vec(lastK+s.nd+i), poly)
			}
		}
		for i := range D {
			encLast(s.vec(lastK+i), D[i], D[i])
			vstore(D[i], Mem{Base: dst, Disp: 16 * s.w * i})
		}
	} else {
		for r := 1; r < 14; r++ {
			for i := range D {
				enc(key(r), D[i], D[i])
			}
		}
		for i := range D {
			encLast(key(14), D[i], D[i])
		}
		for i := range D {
			vxor(TW[i], D[i], D[i])
			vstore(D[i], Mem{Base: dst, Disp: 16 * s.w * i})
		}
		if s.w == 1 {
			// One tweak per register: a chain of doublings (the next group's first tweak
			// is the last one times x); see the package comment.
			mulX(TW[0], TW[len(TW)-1], D[0])
			for i := 1; i < len(TW); i++ {
				mulX(TW[i], TW[i-1], D[i])
			}
		} else {
			for i := range D {
				mulXBytes(TW[i], B/8, D[i], poly)
			}
		}
	}
	ADDQ(U32(groupBytes), src)
	ADDQ(U32(groupBytes), dst)
	SUBQ(U32(groupBytes), m)
	JMP(LabelRef(name + "_group"))

	Label(name + "_tail")
	Comment("Blocks left over (data units that are not a multiple of the group), one at a time.")
	TESTQ(m, m)
	JZ(LabelRef(name + "_next"))
	t := xmm(TW[0])
	Label(name + "_block")
	vxor(Mem{Base: src}, t, X0)
	vxor(keyX(0), X0, X0)
	for r := 1; r < 14; r++ {
		enc(keyX(r), X0, X0)
	}
	encLast(keyX(14), X0, X0)
	vxor(t, X0, X0)
	vstore(X0, Mem{Base: dst})
	mulXk(t, t, 1, X1, X2, poly)
	ADDQ(Imm(16), src)
	ADDQ(Imm(16), dst)
	SUBQ(Imm(16), m)
	JNZ(LabelRef(name + "_block"))

	Label(name + "_next")
	SUBQ(unit, n)
	JNZ(LabelRef(name + "_unit"))
	if s.resident {
		Comment("Leave no round keys in registers 16..30 (VZEROUPPER does not reach them).")
		for r := 0; r < 15; r++ {
			x := xmm(s.vec(16 + r))
			VPXORQ(x, x, x)
		}
	}
	VZEROUPPER()
	RET()
}
