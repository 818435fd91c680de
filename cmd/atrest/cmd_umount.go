package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
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
			"mount. Refuses (exit code 6) while files are open on the volume.\n\n" +
			"If the NBD server that the mount uses does not answer within a few seconds, waiting\n" +
			"could take minutes (every request waits for it up to the mount's --io-timeout), so the\n" +
			"volume is taken down at once instead: the FUSE connection is aborted (everything\n" +
			"waiting on it fails), the file system unmounted and the loop device detached lazily,\n" +
			"and the mount process exits without flushing. It says what was lost: the writes the\n" +
			"mount had sent that the server had not yet flushed, and whatever the file system had\n" +
			"not written out since the last sync. Exit code 8.\n\n" +
			"Ctrl-C stops the wait; running the command again finishes. A mount point with nothing\n" +
			"mounted fails (exit code 1; a stale record of a mount whose process is gone is removed,\n" +
			"with exit code 0), and one where something else is mounted is refused (exit code 6).",
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
// system, the loop device, the FUSE mount (package mountstack), and says what it did
// when that was not an ordered stop.
func runUmount(ctx context.Context, o umountOptions) error {
	mp, err := mountstack.AbsMountpoint(o.mountpoint)
	if err != nil {
		return usageError(err)
	}
	res, err := mountstack.Unmount(ctx, mp, o.timeout)
	if err != nil {
		return umountError(err, mp)
	}
	return umountReport(res, mp, o.out)
}

// umountReport says what Unmount did, on out or as the error the command exits with
// when writes were lost.
func umountReport(res mountstack.Unmounted, mp string, out io.Writer) error {
	if res.Outcome == mountstack.Abandoned {
		return fail(exitcodes.IO, errors.New(abandoned(res, mp)), journalHint)
	}
	if res.Lost != nil {
		what := lostWrites(res.Lost.Writes, res.Lost.Bytes)
		if res.Lost.Writes == 0 {
			// The final flush failed with nothing waiting for the server: the writes
			// that failed had failed before, in the programs that made them.
			what = "no write was left waiting for the server; writes that failed before returned errors to the programs that made them"
		}
		lost := fmt.Sprintf("could not flush to the NBD server %s: %s", res.Server, what)
		if res.Outcome == mountstack.Stopped {
			return fail(exitcodes.IO, fmt.Errorf("unmounted %s, but its mount process (pid %d) %s", mp, res.PID, lost), journalHint)
		}
		return fail(exitcodes.IO, fmt.Errorf("the mount process (pid %d) of %s had exited and %s; removed what it left", res.PID, mp, lost), journalHint)
	}
	switch res.Outcome {
	case mountstack.CleanedUp:
		fmt.Fprintf(out, "atrest umount: the mount process (pid %d) of %s had exited: removed what it left\n", res.PID, mp)
	case mountstack.StaleState:
		fmt.Fprintf(out, "atrest umount: nothing was mounted on %s; removed the stale record of an 'atrest mount' (pid %d) that had exited\n", mp, res.PID)
	case mountstack.Unrecorded:
		fmt.Fprintf(out, "atrest umount: %s had no record of its 'atrest mount'; took the atrest stack found there down\n", mp)
	}
	return nil
}

// journalHint is the hint of an unmount that lost writes.
const journalHint = "'atrest mount' replays the file system's journal once the server is back; files written since the last sync may be incomplete"

// abandoned says what an abandoned volume lost.
func abandoned(res mountstack.Unmounted, mp string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "the NBD server is unreachable (%v): the volume on %s was detached without waiting for it", res.Unreachable, mp)
	switch {
	case res.Lost != nil:
		fmt.Fprintf(&b, "; %s", lostWrites(res.Lost.Writes, res.Lost.Bytes))
	case res.Killed:
		fmt.Fprintf(&b, "; the mount process (pid %d) had to be killed, so the writes it had not flushed to the server are lost and not counted", res.PID)
	default:
		fmt.Fprintf(&b, "; the mount process (pid %d) exited without saying what it had not flushed to the server", res.PID)
	}
	b.WriteString("; whatever the file system had not yet written out is lost too")
	if len(res.Held) > 0 {
		fmt.Fprintf(&b, "; files still open there keep %s attached until they are closed (they get I/O errors)", strings.Join(res.Held, ", "))
	}
	return b.String()
}

// umountError gives an error of mountstack.Unmount its exit code and hint.
func umountError(err error, mp string) error {
	switch {
	case errors.Is(err, mountstack.ErrNotMounted):
		return fail(exitcodes.Failure, err, "")
	case errors.Is(err, mountstack.ErrNotAtrest):
		return fail(exitcodes.Busy, err, "use umount(8) for mounts that atrest did not make")
	case errors.Is(err, mountstack.ErrFilesOpen):
		return fail(exitcodes.Busy, err, "close the files open on "+mp+" and retry")
	case errors.Is(err, mountstack.ErrTeardownTimeout):
		return fail(exitcodes.Busy, err, "it may be waiting for files still open on the volume; its log says more")
	case errors.Is(err, mountstack.ErrInterrupted):
		return fail(exitcodes.Failure, err, "run 'atrest umount "+mp+"' again to finish")
	case errors.Is(err, mountstack.ErrState):
		return fail(exitcodes.Failure, err, "remove the state file if no 'atrest mount' serves "+mp)
	}
	return fail(exitcodes.Failure, err, "")
}
