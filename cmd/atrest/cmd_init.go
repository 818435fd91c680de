package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/keystore"
)

type initOptions struct {
	keystore string
	out      io.Writer
}

func init() {
	register(&cli.Command{
		Name:  "init",
		Usage: "create the keystore: a master key and a new cluster",
		Description: "Creates the keystore directory (mode 0700) with a random 32-byte master key\n" +
			"(master.key, mode 0600, usable as 'cryptsetup --key-file') and keystore.json\n" +
			"with a new cluster UUID. Refuses a directory that already holds a keystore;\n" +
			"rerun after an interrupted init, it finishes that init with the master.key it wrote.",
		Flags: []cli.Flag{keystoreFlag()},
		Action: func(c *cli.Context) error {
			if c.NArg() != 0 {
				return usagef("init takes no arguments")
			}
			return runInit(c.Context, initOptions{keystore: c.String("keystore"), out: c.App.Writer})
		},
	})
}

func runInit(_ context.Context, o initOptions) error {
	k, err := keystore.Init(o.keystore)
	if err != nil {
		return keystoreError(err)
	}
	defer k.Close()
	s := k.State()
	if k.InitResumed() {
		fmt.Fprintf(o.out, "Finished an interrupted init: kept the master.key it had written\n")
	}
	fmt.Fprintf(o.out, "Created keystore %s\n", o.keystore)
	fmt.Fprintf(o.out, "Cluster UUID: %s\n", s.ClusterUUID)
	fmt.Fprintf(o.out, "Master key:   %s (%s)\n", s.MasterKey.ID, filepath.Join(o.keystore, keystore.MasterKeyFile))
	fmt.Fprintf(o.out, "Keep a copy of master.key somewhere safe: without it no drive opens.\n")
	return nil
}
