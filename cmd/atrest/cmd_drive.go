package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/node"
)

func init() {
	register(&cli.Command{
		Name:  "drive",
		Usage: "format, adopt and list the drives of the cluster",
		Subcommands: []*cli.Command{
			{
				Name:      "format",
				Usage:     "write a LUKS2 header with a new data key wrapped by the master key, and register the drive",
				ArgsUsage: "PATH",
				Description: "Formats through the daemon when it serves the keystore: the new volume is then\n" +
					"served at once, as an NBD export named after it.",
				Flags: []cli.Flag{
					keystoreFlag(),
					controlFlag(),
					&cli.StringFlag{Name: "volume", Usage: "volume name (default: the first free volN)"},
					&cli.IntFlag{Name: "sector-size", Value: 4096, Usage: "data sector size, 4096 or 512"},
					&cli.StringFlag{Name: "create", Usage: "create PATH as a sparse image file of this size (e.g. 1G)"},
					&cli.BoolFlag{Name: "force", Usage: "format even if PATH holds a LUKS header, a file system or a partition table"},
					&cli.BoolFlag{Name: "allow-discards", Usage: "pass discards (TRIM) to the drive: reveals which sectors are unused"},
					&cli.BoolFlag{Name: "wipe", Usage: "fill the data area with encrypted zeroes (slow; hides the old contents)"},
				},
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return usagef("drive format takes one PATH")
					}
					o := formatOptions{
						keystore: c.String("keystore"), control: c.String("control"), path: c.Args().First(), volume: c.String("volume"),
						sectorSize: c.Int("sector-size"), force: c.Bool("force"),
						allowDiscards: c.Bool("allow-discards"), wipe: c.Bool("wipe"), out: c.App.Writer, errOut: c.App.ErrWriter,
					}
					if s := c.String("create"); s != "" {
						n, err := parseSize(s)
						if err != nil {
							return usageError(err)
						}
						o.create = n
					}
					return runFormat(c.Context, o)
				},
			},
			{
				Name:      "adopt",
				Usage:     "bring an existing LUKS2 drive into the cluster, keeping its data",
				ArgsUsage: "PATH",
				Description: "Opens PATH with --key-file, adds a keyslot wrapped by the master key, writes the atrest\n" +
					"token, then wipes the keyslot the old key file opened (unless --keep-old-keyslot).\n" +
					"The drive must use aes-xts-plain64 with a 512-bit key (cryptsetup's default).",
				Flags: []cli.Flag{
					keystoreFlag(),
					controlFlag(),
					&cli.StringFlag{Name: "key-file", Usage: "key file that opens the drive now (required)"},
					&cli.StringFlag{Name: "volume", Usage: "volume name (default: the first free volN)"},
					&cli.BoolFlag{Name: "keep-old-keyslot", Usage: "keep the keyslot the old key file opens"},
				},
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return usagef("drive adopt takes one PATH")
					}
					if c.String("key-file") == "" {
						return usagef("drive adopt needs --key-file: the key file that opens the drive now")
					}
					return runAdopt(c.Context, adoptOptions{
						keystore: c.String("keystore"), control: c.String("control"), path: c.Args().First(), keyFile: c.String("key-file"),
						volume: c.String("volume"), keepOld: c.Bool("keep-old-keyslot"), out: c.App.Writer,
					})
				},
			},
			{
				Name:      "show",
				Usage:     "one drive: its registry entry and its state now",
				ArgsUsage: "DRIVE",
				Description: "DRIVE is the drive's UUID, a unique prefix of it (at least 8 characters) or its\n" +
					"current path.",
				Flags: []cli.Flag{keystoreFlag(), controlFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON"}},
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return usagef("drive show takes one DRIVE")
					}
					return runDriveShow(c.Context, c.String("keystore"), c.String("control"), c.Args().First(), c.Bool("json"), c.App.Writer)
				},
			},
			{
				Name:  "list",
				Usage: "list the drives of the cluster",
				Flags: []cli.Flag{keystoreFlag(), controlFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON"}},
				Action: func(c *cli.Context) error {
					if c.NArg() != 0 {
						return usagef("drive list takes no arguments")
					}
					return runDriveList(c.Context, driveListOptions{keystore: c.String("keystore"), control: c.String("control"), json: c.Bool("json"), out: c.App.Writer})
				},
			},
		},
	})
}

type formatOptions struct {
	keystore, control, path, volume string
	sectorSize                      int
	create                          int64
	force, allowDiscards            bool
	wipe                            bool
	out, errOut                     io.Writer
}

func runFormat(ctx context.Context, o formatOptions) (err error) {
	// The registry keeps absolute paths: the daemon runs elsewhere.
	if o.path, err = filepath.Abs(o.path); err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	if o.sectorSize != 512 && o.sectorSize != 4096 {
		return usagef("--sector-size %d: use 4096 or 512", o.sectorSize)
	}
	if o.volume != "" && !node.ValidVolumeName(o.volume) {
		return usagef("--volume %q: use 1 to 64 letters, digits, '.', '_' or '-'", o.volume)
	}
	svc, daemon, done, err := service(ctx, o.keystore, o.control)
	if err != nil {
		return err
	}
	defer done()
	req := node.AddDriveRequest{Path: o.path, Volume: o.volume, SectorSize: o.sectorSize, Create: o.create,
		Force: o.force, AllowDiscards: o.allowDiscards, Wipe: o.wipe}
	if o.wipe && !daemon {
		req.Progress = wipeProgress(o.errOut)
	}
	res, err := svc.AddDrive(ctx, req)
	if err != nil {
		return addDriveError(err, o.create > 0)
	}
	d := res.Drive
	fmt.Fprintf(o.out, "Formatted %s: drive %s, volume %s, sector size %d\n", d.Path, d.UUID, d.Volume, d.SectorSize)
	printExported(o.out, res)
	return nil
}

// printExported says that the daemon serves the volume of a drive just added.
func printExported(w io.Writer, res *node.AddDriveResult) {
	if res.Exported {
		fmt.Fprintf(w, "Served by the daemon as NBD export %q\n", res.Drive.Volume)
	}
}

// addDriveError maps an error of AddDrive to an exit code and a hint.
func addDriveError(err error, create bool) error {
	var holds *node.HoldsDataError
	switch {
	case errors.As(err, &holds) || errors.Is(err, node.ErrHoldsData):
		return fail(exitcodes.Exists, err, "formatting destroys it; rerun with --force if that is what you want")
	case errors.Is(err, node.ErrInvalid):
		return usageError(err)
	case create && errors.Is(err, os.ErrExist):
		return fail(exitcodes.Exists, err, "--create makes a new file; rerun with --force to replace it, or drop --create")
	case errors.Is(err, os.ErrNotExist) && !create:
		return fail(exitcodes.DriveMissing, err, "check the path; --create SIZE makes an image file")
	case errors.Is(err, node.ErrRotationRunning):
		return fail(exitcodes.Busy, err, "wait for the key rotation to finish")
	}
	return keystoreError(err)
}

// wipeProgress shows a wipe's progress on a terminal.
func wipeProgress(w io.Writer) func(done, total int64) {
	if !onTerminal(w) {
		return nil
	}
	last := time.Now()
	return func(done, total int64) {
		if done == total {
			fmt.Fprintf(w, "\rwiping: 100%%\n")
		} else if time.Since(last) > 500*time.Millisecond {
			fmt.Fprintf(w, "\rwiping: %3d%%", done*100/total)
			last = time.Now()
		}
	}
}

type adoptOptions struct {
	keystore, control, path, keyFile, volume string
	keepOld                                  bool
	out                                      io.Writer
}

func runAdopt(ctx context.Context, o adoptOptions) error {
	if o.volume != "" && !node.ValidVolumeName(o.volume) {
		return usagef("--volume %q: use 1 to 64 letters, digits, '.', '_' or '-'", o.volume)
	}
	var err error
	if o.path, err = filepath.Abs(o.path); err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	if o.keyFile, err = filepath.Abs(o.keyFile); err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	// The node reads the key file (its bytes never travel); a wrong name is a usage
	// mistake, told before anything is locked.
	fi, err := os.Stat(o.keyFile)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return usageError(fmt.Errorf("--key-file: %w", err))
	case err != nil:
		return fail(exitcodes.Failure, fmt.Errorf("--key-file: %w", err), "")
	case fi.IsDir():
		return usageError(fmt.Errorf("--key-file: %s: %w", o.keyFile, syscall.EISDIR))
	}
	svc, _, done, err := service(ctx, o.keystore, o.control)
	if err != nil {
		return err
	}
	defer done()
	res, err := svc.AddDrive(ctx, node.AddDriveRequest{Path: o.path, Volume: o.volume, AdoptKeyFile: o.keyFile, KeepOldKeyslot: o.keepOld})
	if err != nil {
		if errors.Is(err, node.ErrWrongKey) {
			return fail(exitcodes.Key, err, "the key file does not open this drive; nothing was changed")
		}
		return addDriveError(err, false)
	}
	d := res.Drive
	fmt.Fprintf(o.out, "Adopted %s: drive %s, volume %s, sector size %d\n", d.Path, d.UUID, d.Volume, d.SectorSize)
	if !o.keepOld && res.OldKeyslot != nil {
		fmt.Fprintf(o.out, "Wiped keyslot %d (the old key file no longer opens the drive)\n", *res.OldKeyslot)
	}
	for _, s := range res.OtherKeyslot {
		fmt.Fprintf(o.out, "Warning: keyslot %d is not managed by atrest and still opens the drive; remove it with 'cryptsetup luksKillSlot %s %d'\n", s, d.Path, s)
	}
	printExported(o.out, res)
	return nil
}

type driveListOptions struct {
	keystore, control string
	json              bool
	out               io.Writer
}

func runDriveList(ctx context.Context, o driveListOptions) error {
	svc, _, done, err := service(ctx, o.keystore, o.control)
	if err != nil {
		return err
	}
	defer done()
	list, err := svc.Drives(ctx)
	if err != nil {
		return keystoreError(err)
	}
	if o.json {
		b, _ := json.MarshalIndent(list, "", "  ")
		_, err := fmt.Fprintf(o.out, "%s\n", b)
		return err
	}
	return printDrives(o.out, list, "")
}

func runDriveShow(ctx context.Context, keystore, control, name string, asJSON bool, w io.Writer) error {
	if strings.HasPrefix(name, ".") || strings.Contains(name, "/") {
		// A path: the registry keeps absolute ones.
		if abs, err := filepath.Abs(name); err == nil {
			name = abs
		}
	}
	svc, _, done, err := service(ctx, keystore, control)
	if err != nil {
		return err
	}
	defer done()
	d, err := svc.Drive(ctx, name)
	if err != nil {
		return keystoreError(err)
	}
	if asJSON {
		b, _ := json.MarshalIndent(d, "", "  ")
		_, err := fmt.Fprintf(w, "%s\n", b)
		return err
	}
	return printDrives(w, []node.DriveStatus{*d}, "")
}
