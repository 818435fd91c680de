package mountstack

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/volmount"
)

// Unmount takes down, from any process, the stack that Mount set up on mountpoint, in
// order: it unmounts the file system here (files still open there are a refusal that
// changes nothing: ErrFilesOpen), then asks the process that serves the stack to Close
// it (SIGTERM) and waits for that process to exit, for at most timeout or until ctx is
// done (ErrTeardownTimeout). Then it removes whatever is left, as after a crash: the
// loop device, the FUSE mount, the FUSE directory that Mount made, the state file.
//
// Without a state file, an atrest stack found on the mount point is taken down all
// the same, a file system of something else is refused (ErrNotAtrest), and nothing
// mounted at all is not an error. A state file that cannot be read fails with
// ErrState.
func Unmount(ctx context.Context, mountpoint string, timeout time.Duration) error {
	mp, err := AbsMountpoint(mountpoint)
	if err != nil {
		return err
	}
	st, err := volmount.Inspect(mp)
	if err != nil {
		return err
	}
	state, err := ReadState(mp)
	if errors.Is(err, os.ErrNotExist) {
		return unmountUnrecorded(st)
	}
	if err != nil {
		return mark(err, ErrState)
	}
	// The file system first, here, so that files still open are a clean refusal that
	// changes nothing.
	if st.Mounted() {
		if st.File != state.File {
			return mark(fmt.Errorf("%s has %s (%s) mounted on it, not the volume 'atrest mount' recorded (%s)", mp, st.Source, st.FSType, state.File), ErrNotAtrest)
		}
		if err := volmount.Unmount(mp, false); err != nil {
			if errors.Is(err, syscall.EBUSY) {
				return mark(err, ErrFilesOpen)
			}
			if !state.Alive() {
				// Its FUSE server is gone: whatever the file system still had to
				// write is lost anyway; take it off.
				err = volmount.Unmount(mp, true)
			}
			if err != nil {
				return err
			}
		}
	}
	if state.Alive() {
		if err := stopProcess(ctx, state, timeout); err != nil {
			return err
		}
	}
	// Whatever the process left (it was killed, or died during its teardown).
	if err := volmount.Teardown(state.File); err != nil {
		return err
	}
	if err := volmount.UnmountFUSE(state.FUSEDir); err != nil {
		return err
	}
	removeFUSEDir(state.FUSEDir)
	return removeState(mp)
}

// unmountUnrecorded handles a mount point without a state file: an atrest stack
// (state lost) is taken down, a mount of something else is refused, nothing at all
// is fine.
func unmountUnrecorded(st volmount.Stack) error {
	switch {
	case !st.Mounted():
		return nil
	case !st.Atrest():
		return mark(fmt.Errorf("%s is not an atrest volume: %s (%s) is mounted on it", st.Mountpoint, st.Source, st.FSType), ErrNotAtrest)
	}
	if err := volmount.Teardown(st.Mountpoint); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return mark(err, ErrFilesOpen)
		}
		return err
	}
	removeFUSEDir(st.FUSEDir)
	return nil
}

// stopProcess asks the process that serves s to finish (SIGTERM: it detaches the loop
// device, ends the FUSE mount, flushes and exits) and waits for it to exit.
func stopProcess(ctx context.Context, s *State, timeout time.Duration) error {
	pfd, err := unix.PidfdOpen(s.PID, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("watch the mount process %d: %w", s.PID, err)
	}
	defer unix.Close(pfd)
	if !s.Alive() { // the pid was reused before pidfd_open
		return nil
	}
	if err := unix.PidfdSendSignal(pfd, unix.SIGTERM, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		return fmt.Errorf("signal the mount process %d: %w", s.PID, err)
	}
	deadline := time.Now().Add(timeout)
	for {
		// A pidfd becomes readable when the process exits.
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}, 200)
		if n > 0 {
			return nil
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("wait for the mount process %d: %w", s.PID, err)
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			return mark(fmt.Errorf("the mount process %d of %s has not finished its teardown", s.PID, s.Mountpoint), ErrTeardownTimeout)
		}
	}
}
