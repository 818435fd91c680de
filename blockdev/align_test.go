package blockdev

import "testing"

func TestAlignedBuffer(t *testing.T) {
	for _, n := range []int{0, 1, 511, 4096, 4097, 1 << 20} {
		b := AlignedBuffer(n)
		if len(b) != n || cap(b) != n {
			t.Errorf("AlignedBuffer(%d): len %d cap %d", n, len(b), cap(b))
		}
		if n > 0 && !isAligned(b, BufferAlign) {
			t.Errorf("AlignedBuffer(%d) is not aligned to %d", n, BufferAlign)
		}
	}
	if !isAligned(AlignedBuffer(8)[1:1], 4096) {
		t.Error("an empty slice counts as aligned")
	}
	if isAligned(AlignedBuffer(8)[1:], 2) {
		t.Error("AlignedBuffer(8)[1:] counted as aligned to 2")
	}
}

// TestAlignedInner compares alignedInner with a brute-force search.
func TestAlignedInner(t *testing.T) {
	for _, align := range []int64{1, 2, 512, 4096} {
		for off := int64(0); off < 3*align+3; off += max(align/8, 1) {
			for n := int64(0); n < 4*align+3; n += max(align/16, 1) {
				a, b := alignedInner(off, n, align)
				wa, wb := int64(-1), int64(-1)
				for x := off; x <= off+n; x++ {
					if x%align == 0 {
						if wa < 0 {
							wa = x
						}
						wb = x
					}
				}
				if wa < 0 || wb == wa {
					if a != b {
						t.Fatalf("alignedInner(%d, %d, %d) = [%d, %d), want empty", off, n, align, a, b)
					}
					continue
				}
				if a != wa || b != wb {
					t.Fatalf("alignedInner(%d, %d, %d) = [%d, %d), want [%d, %d)", off, n, align, a, b, wa, wb)
				}
			}
		}
		if alignUp(align+1, align) != 2*align || alignDown(2*align-1, align) != align {
			t.Fatalf("alignUp/alignDown by %d", align)
		}
	}
	for x, want := range map[int64]bool{0: false, 1: true, 3: false, 4096: true, -4096: false, 1 << 40: true} {
		if isPowerOfTwo(x) != want {
			t.Errorf("isPowerOfTwo(%d) = %v", x, !want)
		}
	}
}
