package fusefs

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrReexec is what EnsureIOFlusher returns if re-executing the process failed after
// the flag was set on the calling thread only.
var ErrReexec = errors.New("fusefs: re-executing the process as an I/O flusher failed")

// EnsureIOFlusher makes the whole process an I/O flusher (prctl PR_SET_IO_FLUSHER,
// Linux 5.6+), as a process that serves a block device's I/O must be: memory reclaim
// in its threads then never waits for I/O, which could be I/O that only this process
// can complete (ext4 on a loop device on this process's FUSE file: a reclaim that
// writes back ext4 pages while the server needs memory to serve them would deadlock).
//
// The flag is per thread, and the Go runtime has started threads before main runs, so
// setting it on one thread is not enough: when the calling thread lacks it,
// EnsureIOFlusher sets it and re-executes /proc/self/exe with the same arguments and
// environment; execve keeps the flag, and every thread of the new image inherits it.
// In the new image (which runs main again) it finds the flag and returns nil. Call it
// first thing in main, before anything that must not happen twice. On success it never
// returns in the old image. Without CAP_SYS_RESOURCE (which even PR_GET_IO_FLUSHER
// needs) it fails with an error wrapping EPERM; a caller may go on without the flag,
// and should say that memory pressure can then deadlock the mount.
func EnsureIOFlusher() error {
	on, err := unix.PrctlRetInt(unix.PR_GET_IO_FLUSHER, 0, 0, 0, 0)
	if err != nil {
		return fmt.Errorf("fusefs: prctl PR_GET_IO_FLUSHER (Linux 5.6+, CAP_SYS_RESOURCE): %w", err)
	}
	if on == 1 {
		return nil
	}
	if os.Getenv(reexecEnv) != "" {
		// Re-executed already, yet without the flag: do not loop.
		return fmt.Errorf("%w: the new image does not have the flag", ErrReexec)
	}
	// prctl and execve must run on the same thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("fusefs: prctl PR_SET_IO_FLUSHER (it needs CAP_SYS_RESOURCE): %w", err)
	}
	env := append(os.Environ(), reexecEnv+"=1")
	err = syscall.Exec("/proc/self/exe", os.Args, env)
	unix.Prctl(unix.PR_SET_IO_FLUSHER, 0, 0, 0, 0)
	return fmt.Errorf("%w: %w", ErrReexec, err)
}

// reexecEnv marks the re-executed image, so that a kernel that drops the flag across
// execve cannot make the process re-execute itself for ever.
const reexecEnv = "ATREST_IO_FLUSHER_REEXEC"
