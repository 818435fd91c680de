package luks2_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"log"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
)

// Format a drive with a LUKS2 header, load it again and unlock the volume key with the
// passphrase. The data segment starts after the 16 MiB header area.
func ExampleFormat() {
	drive := blockdev.NewMem(32 << 20)
	volumeKey := make([]byte, luks2.KeySize)
	rand.Read(volumeKey)
	if _, err := luks2.Format(drive, luks2.FormatOptions{
		VolumeKey:  volumeKey,
		Passphrase: []byte("correct horse battery staple"),
		Label:      "example",
	}); err != nil {
		log.Fatal(err)
	}

	h, err := luks2.Load(drive)
	if err != nil {
		log.Fatal(err)
	}
	key, slot, err := h.Unlock(drive, []byte("correct horse battery staple"))
	if err != nil {
		log.Fatal(err)
	}
	seg := h.Segment()
	fmt.Println("label:", h.Label())
	fmt.Println("keyslot", slot, "gives the volume key:", bytes.Equal(key, volumeKey))
	fmt.Printf("data: %s at %d MiB, %d-byte sectors\n", seg.Encryption, seg.Offset>>20, seg.SectorSize)
	_, _, err = h.Unlock(drive, []byte("wrong"))
	fmt.Println("a wrong passphrase gives ErrWrongKey:", errors.Is(err, luks2.ErrWrongKey))
	// Output:
	// label: example
	// keyslot 0 gives the volume key: true
	// data: aes-xts-plain64 at 16 MiB, 4096-byte sectors
	// a wrong passphrase gives ErrWrongKey: true
}
