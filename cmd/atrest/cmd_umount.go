package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/volmount"
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
// system, the loop device, the FUSE mount.
func runUmount(ctx context.Context, o umountOptions) error {
	mp, err := filepath.Abs(o.mountpoint)
	if err != nil {
		return usageError(err)
	}
	if r, err := filepath.EvalSymlinks(mp); err == nil {
		mp = r
	}
	st, err := volmount.Inspect(mp)
	if err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	state, err := readState(mp)
	if errors.Is(err, os.ErrNotExist) {
		return umountUnrecorded(st)
	}
	if err != nil {
		return fail(exitcodes.Failure, err, "remove the state file if no 'atrest mount' serves "+mp)
	}
	// The file system first, here, so that files still open are a clean refusal that
	// changes nothing.
	if st.Mounted() {
		if st.File != state.File {
			return fail(exitcodes.Failure, fmt.Errorf("%s has %s (%s) mounted on it, not the volume 'atrest mount' recorded (%s)", mp, st.Source, st.FSType, state.File),
				"use umount(8) for mounts that atrest did not make")
		}
		if err := volmount.Unmount(mp, false); err != nil {
			if errors.Is(err, syscall.EBUSY) {
				return fail(exitcodes.Busy, err, "close the files open on "+mp+" and retry")
			}
			if !state.alive() {
				// Its FUSE server is gone: whatever the file system still had to
				// write is lost anyway; take it off.
				err = volmount.Unmount(mp, true)
			}
			if err != nil {
				return fail(exitcodes.Failure, err, "")
			}
		}
	}
	if state.alive() {
		if err := stopMountProcess(ctx, state, o.timeout); err != nil {
			return err
		}
	}
	// Whatever the process left (it was killed, or died during its teardown).
	if err := volmount.Teardown(state.File); err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	if err := volmount.UnmountFUSE(state.FUSEDir); err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	removeFUSEDir(state.FUSEDir)
	if err := removeState(mp); err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	return nil
}

// umountUnrecorded handles a mount point without a state file: an atrest stack
// (state lost) is taken down, a mount of something else is refused, nothing at all
// is fine.
func umountUnrecorded(st volmount.Stack) error {
	switch {
	case !st.Mounted():
		return nil
	case !st.Atrest():
		return fail(exitcodes.Failure, fmt.Errorf("%s is not an atrest volume: %s (%s) is mounted on it", st.Mountpoint, st.Source, st.FSType),
			"use umount(8) for mounts that atrest did not make")
	}
	if err := volmount.Teardown(st.Mountpoint); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return fail(exitcodes.Busy, err, "close the files open on "+st.Mountpoint+" and retry")
		}
		return fail(exitcodes.Failure, err, "")
	}
	removeFUSEDir(st.FUSEDir)
	return nil
}

// stopMountProcess asks the mount process to finish (SIGTERM: it detaches the loop
// device, ends the FUSE mount, flushes and exits) and waits for it to exit.
func stopMountProcess(ctx context.Context, s *mountState, timeout time.Duration) error {
	pfd, err := unix.PidfdOpen(s.PID, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return fail(exitcodes.Failure, fmt.Errorf("watch the mount process %d: %w", s.PID, err), "")
	}
	defer unix.Close(pfd)
	if !s.alive() { // the pid was reused before pidfd_open
		return nil
	}
	if err := unix.PidfdSendSignal(pfd, unix.SIGTERM, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		return fail(exitcodes.Failure, fmt.Errorf("signal the mount process %d: %w", s.PID, err), "")
	}
	deadline := time.Now().Add(timeout)
	for {
		// A pidfd becomes readable when the process exits.
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}, 200)
		if n > 0 {
			return nil
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fail(exitcodes.Failure, fmt.Errorf("wait for the mount process %d: %w", s.PID, err), "")
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			return fail(exitcodes.Busy, fmt.Errorf("the mount process %d of %s has not finished its teardown", s.PID, s.Mountpoint),
				"it may be waiting for files still open on the volume; its log says more")
		}
	}
}
