package slot_test

import (
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/slot"
)

// disk is a drive in memory for the examples: closing it (as the slot does when the
// drive goes) leaves its contents for the next time it is opened, as a disk's.
type disk struct{ *blockdev.Mem }

func (disk) Close() error { return nil }

// formattedDisk returns a disk with a fresh LUKS2 header.
func formattedDisk() *blockdev.Mem {
	mem := blockdev.NewMem(luks2.DataOffset + 1<<20)
	key := make([]byte, luks2.KeySize)
	rand.Read(key)
	if _, err := luks2.Format(mem, luks2.FormatOptions{VolumeKey: key, Passphrase: []byte("example")}); err != nil {
		panic(err)
	}
	return mem
}

// The operator pulls a drive and puts it back at another path: a request made
// meanwhile waits, and then runs on the drive that came back.
func ExampleSlot_Pull() {
	mem := formattedDisk()
	open := func(path string) (blockdev.Device, error) { return disk{mem}, nil }
	s, err := slot.New(disk{mem}, slot.Config{Path: "/dev/sdc", Open: open})
	if err != nil {
		panic(err)
	}
	defer s.Close()
	const off = luks2.DataOffset
	if _, err := s.WriteAt([]byte("written before the pull"), off); err != nil {
		panic(err)
	}

	if err := s.Pull(""); err != nil { // flushes, closes, marks it missing
		panic(err)
	}
	st := s.State()
	fmt.Println(st.Presence, st.Path, st.Reason, st.Generation)

	buf := make([]byte, 23)
	done := make(chan error)
	go func() { _, err := s.ReadAt(buf, off); done <- err }()
	time.Sleep(10 * time.Millisecond) // the read waits for the drive

	if err := s.Reinsert("/dev/sdf"); err != nil {
		panic(err)
	}
	if err := <-done; err != nil {
		panic(err)
	}
	fmt.Println(string(buf))
	st = s.State()
	fmt.Println(st.Presence, st.Path, st.Generation)
	// Output:
	// missing /dev/sdc pulled by the operator 2
	// written before the pull
	// present /dev/sdf 3
}

// A drive put back must be the slot's own: another drive, even one formatted with the
// same UUID, is refused before anything is written to it.
func ExampleSlot_Reinsert() {
	mine, other := formattedDisk(), formattedDisk()
	open := func(path string) (blockdev.Device, error) {
		if path == "/dev/sdg" {
			return disk{other}, nil
		}
		return disk{mine}, nil
	}
	s, err := slot.New(disk{mine}, slot.Config{Path: "/dev/sdc", Open: open})
	if err != nil {
		panic(err)
	}
	defer s.Close()
	if err := s.Pull(""); err != nil {
		panic(err)
	}
	err = s.Reinsert("/dev/sdg")
	fmt.Println(errors.Is(err, slot.ErrNotSameDrive), s.State().Presence)
	err = s.Reinsert("/dev/sdc")
	fmt.Println(err, s.State().Presence)
	// Output:
	// true missing
	// <nil> present
}

// A drive's identity is its LUKS2 UUID and the digest of its data key: the same drive
// read twice has the same, a drive formatted again has another.
func ExampleIdentify() {
	mem := formattedDisk()
	a, _ := slot.Identify(mem)
	b, _ := slot.Identify(mem)
	c, _ := slot.Identify(formattedDisk())
	fmt.Println(a == b, a == c)
	// Output:
	// true false
}
