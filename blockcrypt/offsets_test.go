package blockcrypt

import (
	"math/rand/v2"
	"testing"
)

func TestSplit(t *testing.T) {
	l := layout{size: 1 << 20, sectorSize: 4096}
	for _, tc := range []struct {
		off, n           int64
		head, body, tail span
	}{
		{0, 0, span{0, 0}, span{0, 0}, span{0, 0}},
		{0, 4096, span{0, 0}, span{0, 4096}, span{4096, 0}},
		{0, 8192, span{0, 0}, span{0, 8192}, span{8192, 0}},
		{10, 20, span{10, 20}, span{30, 0}, span{30, 0}},
		{0, 100, span{0, 0}, span{0, 0}, span{0, 100}},
		{100, 3996, span{100, 3996}, span{4096, 0}, span{4096, 0}},
		{100, 4000, span{100, 3996}, span{4096, 0}, span{4096, 4}},
		{100, 10000, span{100, 3996}, span{4096, 4096}, span{8192, 1908}},
		{4096, 5000, span{4096, 0}, span{4096, 4096}, span{8192, 904}},
		{4095, 2, span{4095, 1}, span{4096, 0}, span{4096, 1}},
		{5, 0, span{5, 0}, span{5, 0}, span{5, 0}},
	} {
		h, b, tl := l.split(tc.off, tc.n)
		if h != tc.head || b != tc.body || tl != tc.tail {
			t.Errorf("split(%d, %d) = %v %v %v, want %v %v %v", tc.off, tc.n, h, b, tl, tc.head, tc.body, tc.tail)
		}
	}
}

// TestSplitProperties checks split's invariants on random ranges at both sector sizes.
func TestSplitProperties(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, ss := range []int64{512, 4096} {
		l := layout{size: 64 * ss, sectorSize: ss}
		for range 20000 {
			off := rng.Int64N(l.size + 1)
			n := rng.Int64N(l.size - off + 1)
			h, b, tl := l.split(off, n)
			if h.off != off || h.end() != b.off || b.end() != tl.off || tl.end() != off+n {
				t.Fatalf("ss %d split(%d, %d) = %v %v %v: pieces do not tile the range", ss, off, n, h, b, tl)
			}
			if h.n < 0 || b.n < 0 || tl.n < 0 {
				t.Fatalf("negative piece: %v %v %v", h, b, tl)
			}
			if b.n > 0 && (b.off%ss != 0 || b.n%ss != 0) {
				t.Fatalf("ss %d split(%d, %d): body %v not whole sectors", ss, off, n, b)
			}
			for _, p := range []span{h, tl} {
				if p.n == 0 {
					continue
				}
				if p.n >= ss || l.sectorStart(p.off) != l.sectorStart(p.end()-1) {
					t.Fatalf("ss %d split(%d, %d): partial piece %v not inside one sector", ss, off, n, p)
				}
			}
			if h.n > 0 && tl.n > 0 && b.n == 0 && l.sectorStart(h.off) == l.sectorStart(tl.off) {
				t.Fatalf("ss %d split(%d, %d): head and tail in the same sector", ss, off, n)
			}
		}
	}
}

func TestIV(t *testing.T) {
	for _, tc := range []struct {
		ss       int64
		tweak    uint64
		off      int64
		wantIV   uint64
		wantLowr int64
	}{
		{512, 0, 0, 0, 1 << 20},
		{512, 0, 512, 1, 1<<20 + 512},
		{4096, 0, 4096, 8, 1<<20 + 4096}, // 512-byte units even for 4096-byte sectors
		{4096, 5, 3 * 4096, 5 + 24, 1<<20 + 3*4096},
		{4096, ^uint64(0) - 7, 8192, 8, 1<<20 + 8192}, // plain64 wraps modulo 2^64
	} {
		l := layout{base: 1 << 20, size: 1 << 30, sectorSize: tc.ss, ivTweak: tc.tweak}
		if got := l.iv(tc.off); got != tc.wantIV {
			t.Errorf("ss %d tweak %d: iv(%d) = %d, want %d", tc.ss, tc.tweak, tc.off, got, tc.wantIV)
		}
		if got := l.lowerOffset(tc.off); got != tc.wantLowr {
			t.Errorf("lowerOffset(%d) = %d, want %d", tc.off, got, tc.wantLowr)
		}
	}
	l := layout{size: 8192, sectorSize: 4096}
	expectPanic(t, "iv inside a sector", "inside a sector", func() { l.iv(100) })
}

func TestLockKeys(t *testing.T) {
	for _, tc := range []struct{ off, n, first, count int64 }{
		{0, 1, 0, 1},
		{0, lockUnit, 0, 1},
		{0, lockUnit + 1, 0, 2},
		{lockUnit - 1, 2, 0, 2},
		{3 * lockUnit, 1 << 20, 3, (1 << 20) / lockUnit},
		{100, 1 << 20, 0, (1<<20)/lockUnit + 1},
	} {
		first, count := lockKeys(tc.off, tc.n)
		if first != tc.first || count != tc.count {
			t.Errorf("lockKeys(%d, %d) = %d, %d, want %d, %d", tc.off, tc.n, first, count, tc.first, tc.count)
		}
	}
}
