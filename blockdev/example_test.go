package blockdev_test

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// A layer asks the device below what it can do, and answers for itself from that: here
// a Faulty over a Mem, which trims and zeroes fast, and one over a device that only has
// the methods of Device.
func ExampleCapsOf() {
	mem := blockdev.NewMem(1 << 20)
	fmt.Printf("%+v\n", blockdev.CapsOf(blockdev.NewFaulty(mem)))

	plain := struct{ blockdev.Device }{blockdev.NewMem(1 << 20)}
	fmt.Printf("%+v\n", blockdev.CapsOf(blockdev.NewFaulty(plain)))
	// Output:
	// {ReadOnly:false Trim:true Zeroes:true FastZero:true FUA:true BlockSize:512}
	// {ReadOnly:false Trim:false Zeroes:true FastZero:false FUA:true BlockSize:512}
}

// A mirror bounds each member's calls: a member that stops answering fails the call
// with ErrTimeout after the limit, instead of holding the volume.
func ExampleBound() {
	drive := blockdev.NewFaulty(blockdev.NewMem(1 << 20))
	member := blockdev.Bound(drive, 100*time.Millisecond)
	defer member.Close()

	release := drive.Hang() // the drive stops answering
	_, err := member.ReadAt(make([]byte, 4096), 0)
	fmt.Println(errors.Is(err, blockdev.ErrTimeout), member.Stuck())

	release() // it answers again: the call left behind returns, its result dropped
	for member.Stuck() > 0 {
		time.Sleep(time.Millisecond)
	}
	_, err = member.ReadAt(make([]byte, 4096), 0)
	fmt.Println(err)
	// Output:
	// true 1
	// <nil>
}

// An errno from the kernel gets its class, and keeps the errno: a layer above drops a
// drive that is gone, and retries a medium error on another copy.
func ExampleClassify() {
	for _, errno := range []error{syscall.ENODEV, syscall.EIO, syscall.EINVAL} {
		err := fmt.Errorf("read /dev/sdb at offset 4096: %w", blockdev.Classify(errno))
		fmt.Printf("%v: gone %v, medium %v, errno %v\n", err,
			errors.Is(err, blockdev.ErrGone), errors.Is(err, blockdev.ErrMedium), errors.Is(err, errno))
	}
	// Output:
	// read /dev/sdb at offset 4096: device gone: no such device: gone true, medium false, errno true
	// read /dev/sdb at offset 4096: medium error: input/output error: gone false, medium true, errno true
	// read /dev/sdb at offset 4096: invalid argument: gone false, medium false, errno true
}
