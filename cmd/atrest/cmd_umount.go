package main

import (
	"context"
	"errors"
	"io"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/mountstack"
)

type umountOptions struct {
	mountpoint string
	timeout    time.Duration
	out        io.Writer
}

func init() {
	register(&cli.Command{
		Name:      "umount",
		Usage:     "unmount a volume that 'atrest mount' mounted, and take its stack down",
		ArgsUsage: "MOUNTPOINT",
		Description: "Unmounts the file system, then lets the 'atrest mount' process that serves it detach the\n" +
			"loop device, end the FUSE mount and flush, and waits for it to exit. If that process\n" +
			"is gone (killed, crashed), removes what it left: the mount, the loop device, the FUSE\n" +
			"mount. Refuses (exit code 6) while files are open on the volume. Unmounting a mount\n" +
			"point with nothing of atrest's left on it does nothing.",
		Flags: []cli.Flag{
			&cli.DurationFlag{Name: "timeout", Value: 5 * time.Minute, Usage: "how long to wait for the mount process to finish"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return usagef("umount takes one MOUNTPOINT")
			}
			return runUmount(c.Context, umountOptions{mountpoint: c.Args().First(), timeout: c.Duration("timeout"), out: c.App.ErrWriter})
		},
	})
}

// runUmount takes down what `atrest mount` set up on o.mountpoint, in order: the file
// system, the loop device, the FUSE mount (package mountstack).
func runUmount(ctx context.Context, o umountOptions) error {
	mp, err := mountstack.AbsMountpoint(o.mountpoint)
	if err != nil {
		return usageError(err)
	}
	if err := mountstack.Unmount(ctx, mp, o.timeout); err != nil {
		return umountError(err, mp)
	}
	return nil
}

// umountError gives an error of mountstack.Unmount its exit code and hint.
func umountError(err error, mp string) error {
	switch {
	case errors.Is(err, mountstack.ErrNotAtrest):
		return fail(exitcodes.Failure, err, "use umount(8) for mounts that atrest did not make")
	case errors.Is(err, mountstack.ErrFilesOpen):
		return fail(exitcodes.Busy, err, "close the files open on "+mp+" and retry")
	case errors.Is(err, mountstack.ErrTeardownTimeout):
		return fail(exitcodes.Busy, err, "it may be waiting for files still open on the volume; its log says more")
	case errors.Is(err, mountstack.ErrState):
		return fail(exitcodes.Failure, err, "remove the state file if no 'atrest mount' serves "+mp)
	}
	return fail(exitcodes.Failure, err, "")
}
