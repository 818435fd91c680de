package drive_test

import (
	"fmt"

	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/keystore"
)

// A daemon unlocks a drive of its registry with the keys of the keystore: Keys reads the
// key files at each call, so a rotation finishing in another process meanwhile is
// followed.
func ExampleUnlock() {
	k, err := keystore.Open("/var/lib/atrest")
	if err != nil {
		fmt.Println(err)
		return
	}
	u, err := drive.Unlock("/dev/disk/by-id/ata-example", drive.UnlockOptions{
		ClusterUUID: k.ClusterUUID(),
		UUID:        "a2a1f069-0112-4191-8073-3fa34a9a62c8", // the registry's drive
		Keys:        k.Keys,
		Exclusive:   true,
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer u.Device.Close()
	fmt.Printf("volume %s, %d bytes, opened by %s\n", u.Token.Volume, u.Device.Size(), u.KeyID)
}

// A status report checks each drive with the very validation Unlock applies.
func ExampleCheck() {
	k, err := keystore.Open("/var/lib/atrest")
	if err != nil {
		fmt.Println(err)
		return
	}
	h, err := drive.Check("/dev/disk/by-id/ata-example", drive.UnlockOptions{
		ClusterUUID: k.ClusterUUID(), UUID: "a2a1f069-0112-4191-8073-3fa34a9a62c8", Keys: k.Keys,
	})
	if err != nil {
		fmt.Println(err) // the keys could not be read
		return
	}
	fmt.Println(h.State, h.KeyID, h.Detail)
}
