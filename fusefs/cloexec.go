package fusefs

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// CloseOnExecFUSE sets FD_CLOEXEC on every descriptor of this process that is open on
// /dev/fuse. go-fuse v2.12's direct mount opens /dev/fuse without O_CLOEXEC, so every
// program this process starts afterwards would inherit the FUSE connection and keep
// it, and with it the mount, alive after this process dies (a killed `atrest mount`
// would leave a hung mount instead of a dead one that cleanup can remove). A fork
// by another goroutine between go-fuse's open and this call can still inherit it.
// Mount calls it; any other go-fuse server of the process must call it after mounting.
func CloseOnExecFUSE() error {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("list open files: %w", err)
	}
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil || target != "/dev/fuse" {
			continue // closed since the listing, or something else
		}
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if errors.Is(err, unix.EBADF) {
			continue
		}
		if err != nil {
			return fmt.Errorf("fcntl F_GETFD on /dev/fuse descriptor %d: %w", fd, err)
		}
		if flags&unix.FD_CLOEXEC == 0 {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, flags|unix.FD_CLOEXEC); err != nil {
				return fmt.Errorf("fcntl F_SETFD on /dev/fuse descriptor %d: %w", fd, err)
			}
		}
	}
	return nil
}
