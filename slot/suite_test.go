package slot_test

import (
	"testing"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/blockdev/blockdevtest"
	"github.com/atrest/atrest/slot"
)

// TestConformance runs the Device conformance suite on a slot over a memory drive, with
// the replay log as it comes, with a limit small enough that the suite's writes make
// it flush, and without it. (blockdevtest.RunFaults does not apply: a slot does not
// pass a vanished drive's ErrGone on, it waits for the drive; the tests above cover
// its faults.)
func TestConformance(t *testing.T) {
	for name, limit := range map[string]int64{"Log": 0, "SmallLog": 64 << 10, "NoLog": -1} {
		t.Run(name, func(t *testing.T) {
			blockdevtest.Run(t, blockdevtest.Config{
				New: func(t *testing.T, size int64) blockdev.Device {
					return newSlot(t, newDrive(t, size, sharedHeader()), slot.Config{Path: absentPath(t), LogLimit: limit})
				},
				TrimZeroes: true,
			})
		})
	}
}
