package keystore_test

import (
	"context"
	"fmt"

	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/registry"
)

// A rotation as the node runs it: the custody lock, then the registry's (to migrate a
// keystore.json of version 1 first, and to record the outcome), the registry's active
// drives to rewrap, and their new key ids recorded before the journal is cleared.
func ExampleLocked_Rotate() {
	ctx := context.Background()
	const dir = "/var/lib/atrest"
	l, err := keystore.Lock(dir)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer l.Close()
	store := registry.NewFileStore(dir)
	tx, err := store.Begin(ctx)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer tx.Close()
	if err := l.MigrateV1(tx); err != nil { // nothing to do for version 2
		fmt.Println(err)
		return
	}
	if tx.Registry().ClusterUUID == "" { // no registry yet: no drive was ever added
		tx.Reset(registry.New(l.ClusterUUID()))
	}
	out, err := l.Rotate(ctx, keystore.RotateOptions{
		Drives: keystore.RotateDrives(tx.Registry()),
		Finish: func(out keystore.RotateOutcome) error {
			if err := out.Record(tx.Registry()); err != nil {
				return err
			}
			return tx.Commit()
		},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("master key %s; %d drive(s) rewrapped, %d stale\n", out.NewKeyID, len(out.Rewrapped), len(out.Stale))
}
