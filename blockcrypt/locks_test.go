package blockcrypt

import (
	"slices"
	"testing"
)

func TestLockStripesOrder(t *testing.T) {
	var lt lockTable
	for _, tc := range []struct {
		first, count int64
		want         []int
	}{
		{0, 1, []int{0}},
		{5, 3, []int{5, 6, 7}},
		{lockStripes - 2, 4, []int{0, 1, lockStripes - 2, lockStripes - 1}},
		{3*lockStripes + 1, 2, []int{1, 2}},
	} {
		var got []int
		lt.stripes(tc.first, tc.count, func(i int) { got = append(got, i) })
		if !slices.Equal(got, tc.want) {
			t.Errorf("stripes(%d, %d) = %v, want %v", tc.first, tc.count, got, tc.want)
		}
	}
	for _, count := range []int64{lockStripes - 1, lockStripes, lockStripes + 7, 5 * lockStripes} {
		for _, first := range []int64{0, 1, 700, lockStripes - 1, 12345} {
			var got []int
			lt.stripes(first, count, func(i int) { got = append(got, i) })
			if !slices.IsSorted(got) || len(slices.Compact(slices.Clone(got))) != len(got) {
				t.Fatalf("stripes(%d, %d): not ascending and distinct", first, count)
			}
			if want := min(count, lockStripes); int64(len(got)) != want {
				t.Fatalf("stripes(%d, %d): %d stripes, want %d", first, count, len(got), want)
			}
		}
	}
	// rlock and runlock pair up (a leftover reader would make Lock block forever).
	lt.rlock(lockStripes-3, 10)
	lt.runlock(lockStripes-3, 10)
	for i := range int64(lockStripes) {
		lt.lock(i)
		lt.unlock(i)
	}
}
