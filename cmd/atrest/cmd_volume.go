package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/node"
)

func init() {
	register(&cli.Command{
		Name:  "volume",
		Usage: "list and remove the volumes of the node",
		Subcommands: []*cli.Command{
			{
				Name:  "list",
				Usage: "list the volumes: layout, state, members and, while the daemon serves them, exports and size",
				Flags: []cli.Flag{keystoreFlag(), controlFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON"}},
				Action: func(c *cli.Context) error {
					if c.NArg() != 0 {
						return usagef("volume list takes no arguments")
					}
					return runVolumeList(c.Context, c.String("keystore"), c.String("control"), c.Bool("json"), c.App.Writer)
				},
			},
			{
				Name:      "remove",
				Usage:     "stop serving a volume and remove it and its drives from the registry (their data stays)",
				ArgsUsage: "NAME",
				Description: "The drives keep their LUKS2 headers and data: master.key still opens them with\n" +
					"cryptsetup, and 'atrest drive adopt --key-file MASTER.KEY DRIVE' brings one back. A volume\n" +
					"that clients are connected to is refused unless --force.",
				Flags: []cli.Flag{keystoreFlag(), controlFlag(), &cli.BoolFlag{Name: "force", Usage: "remove it even while clients are connected (they lose the volume)"}},
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return usagef("volume remove takes one NAME")
					}
					return runVolumeRemove(c.Context, c.String("keystore"), c.String("control"), node.RemoveVolumeRequest{Name: c.Args().First(), Force: c.Bool("force")}, c.App.Writer)
				},
			},
		},
	})
}

func runVolumeList(ctx context.Context, keystore, control string, asJSON bool, w io.Writer) error {
	svc, _, done, err := service(ctx, keystore, control)
	if err != nil {
		return err
	}
	defer done()
	vols, err := svc.Volumes(ctx)
	if err != nil {
		return keystoreError(err)
	}
	if asJSON {
		b, _ := json.MarshalIndent(vols, "", "  ")
		_, err := fmt.Fprintf(w, "%s\n", b)
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tUUID\tLAYOUT\tSTATE\tMEMBERS\tSIZE\tEXPORTS")
	for _, v := range vols {
		size, exports := "-", "-"
		if v.Size > 0 {
			size = fmt.Sprint(v.Size)
		}
		if len(v.Exports) > 0 {
			exports = fmt.Sprintf("%q", v.Exports)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", v.Name, v.UUID, v.Layout, v.State, len(v.Members), size, exports)
	}
	return tw.Flush()
}

func runVolumeRemove(ctx context.Context, keystore, control string, req node.RemoveVolumeRequest, w io.Writer) error {
	if !node.ValidVolumeName(req.Name) {
		return usagef("volume name %q: use 1 to 64 letters, digits, '.', '_' or '-'", req.Name)
	}
	svc, _, done, err := service(ctx, keystore, control)
	if err != nil {
		return err
	}
	defer done()
	v, err := svc.RemoveVolume(ctx, req)
	if err != nil {
		if code, _ := node.ErrorCode(err); code == "conflict" {
			return fail(exitcodes.Busy, err, "unmount it ('atrest umount') first, or rerun with --force")
		}
		return keystoreError(err)
	}
	fmt.Fprintf(w, "Removed volume %s (%s) and its %d drive(s) from the node; their data stays on them\n", v.Name, v.UUID, len(v.Members))
	return nil
}
