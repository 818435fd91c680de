package slot_test

import (
	"fmt"
	"testing"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/slot"
)

// BenchmarkSlotWrite compares writes through a slot over a memory drive (the call, the
// copy into the replay log, and a flush each DefaultLogLimit) with writes straight to
// the memory drive: the difference is what the log's copy costs.
func BenchmarkSlotWrite(b *testing.B) {
	const size = 128 << 20
	for _, n := range []int{4 << 10, 1 << 20} {
		for _, through := range []string{"Mem", "Slot"} {
			b.Run(fmt.Sprintf("%dKiB/%s", n>>10, through), func(b *testing.B) {
				mem := newDrive(b, size, sharedHeader())
				// Fault the drive's pages in first, so that both measure writes
				// and not the kernel handing out fresh pages.
				fill := random(1 << 20)
				for off := int64(dataOff); off < size; off += int64(len(fill)) {
					mem.WriteAt(fill, off)
				}
				var dev blockdev.Device = mem
				if through == "Slot" {
					dev = newSlot(b, dev, slot.Config{Path: absentPath(b)})
				}
				p := random(n)
				b.SetBytes(int64(n))
				b.ReportAllocs()
				off := int64(dataOff)
				for b.Loop() {
					if _, err := dev.WriteAt(p, off); err != nil {
						b.Fatal(err)
					}
					if off += int64(n); off+int64(n) > size {
						off = dataOff
					}
				}
			})
		}
	}
}
