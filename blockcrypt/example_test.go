package blockcrypt_test

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"log"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
)

// Encrypt a device: what is written through the Device reaches the drive below as
// XTS-AES-256 ciphertext, 4096-byte sectors, and reads back as the plaintext.
func ExampleNew() {
	drive := blockdev.NewMem(1 << 20)
	key := make([]byte, blockcrypt.KeySize)
	rand.Read(key)
	dev, err := blockcrypt.New(drive, blockcrypt.Config{Key: key})
	clear(key) // the Device keeps its own copy
	if err != nil {
		log.Fatal(err)
	}
	defer dev.Close()

	secret := bytes.Repeat([]byte("attack at dawn! "), 256) // one sector
	if _, err := dev.WriteAt(secret, 8192); err != nil {
		log.Fatal(err)
	}
	onDrive := make([]byte, len(secret))
	drive.ReadAt(onDrive, 8192)
	back := make([]byte, len(secret))
	if _, err := dev.ReadAt(back, 8192); err != nil {
		log.Fatal(err)
	}
	fmt.Println("the drive holds the plaintext:", bytes.Contains(onDrive, []byte("attack")))
	fmt.Println("read back:", string(back[:14]))
	// Output:
	// the drive holds the plaintext: false
	// read back: attack at dawn
}
