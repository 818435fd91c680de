package mountstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/nbd"
	"github.com/atrest/atrest/volmount"
)

// Outcome is what Unmount found and did.
type Outcome int

const (
	// Stopped: the file system was unmounted and the mount process took the rest down
	// in order, flushing the NBD client, and exited.
	Stopped Outcome = iota
	// Abandoned: the NBD server did not answer (Unmounted.Unreachable says why), so
	// the stack was taken down without waiting for I/O that could not complete: the
	// FUSE connection aborted (every request pending on it failed), the file system
	// unmounted lazily (what it had not written is lost), the loop device detached
	// lazily, the mount process told to exit without flushing (SIGUSR1, see
	// Stack.Abandon), which records what it lost (Unmounted.Lost).
	Abandoned
	// CleanedUp: the mount process had exited (crashed, killed); what it left was
	// removed. Whatever it had not flushed is lost, and unknown.
	CleanedUp
	// StaleState: nothing was mounted and nothing left but the state file of a mount
	// process that had exited, which was removed.
	StaleState
	// Unrecorded: there was no state file, and the atrest stack found on the mount
	// point was taken down in order.
	Unrecorded
)

// Unmounted says what Unmount found and did, for the administrator.
type Unmounted struct {
	Outcome    Outcome
	Mountpoint string
	Server     string // the NBD address that the state file records ("" if none)
	PID        int    // the mount process that the state file records (0 if none)
	// Unreachable is why the server counted as gone (Abandoned).
	Unreachable error
	// Lost is what the mount process recorded, when it ended without flushing its NBD
	// client (abandoned, or a Close that could not flush), that the server had not
	// made durable; nil if it recorded nothing. An abandoned process that had to be
	// killed (Killed) records nothing.
	Lost   *Loss
	Killed bool
	// Held lists the loop devices still attached after an abandon: files open on the
	// lazily unmounted file system hold them (with I/O errors) until they are closed;
	// they detach themselves then.
	Held []string
}

// Loss is what a mount process lost with its NBD client: Writes writes (trims and
// zeroings included) of Bytes bytes in all (-1: unknown) that the server had not
// confirmed durable.
type Loss struct {
	Writes int
	Bytes  int64
}

// recordedLoss returns the loss that the state file of mp records, if any.
func recordedLoss(mp string) *Loss {
	s, err := ReadState(mp)
	if err != nil || !s.Lost {
		return nil
	}
	return &Loss{Writes: s.LostWrites, Bytes: s.LostBytes}
}

// Timeouts of the abandon path (variables for tests).
var (
	// probeTimeout bounds the check that the NBD server answers.
	probeTimeout = 5 * time.Second
	// abandonWait bounds the wait for an abandoned mount process to record what it
	// lost and exit; then it is killed.
	abandonWait = 10 * time.Second
)

// Unmount takes down, from any process, the stack that Mount set up on mountpoint, and
// says what it found and did.
//
// While the process that serves the stack runs, Unmount first checks that the NBD
// server answers and offers the export (nbd.Probe, a few seconds at most; a server that
// accepts and closes the connection at once counts as there). If it does,
// the teardown is ordered: Unmount unmounts the file system here (files still open
// there are a refusal that changes nothing: ErrFilesOpen), then asks the process to
// Close the stack (SIGTERM) and waits for it to exit, for at most timeout
// (ErrTeardownTimeout). If the server is gone, nothing may wait for I/O that cannot
// complete: see Abandoned; this takes seconds.
//
// Then, and when the process had exited (CleanedUp), it removes whatever is left, as
// after a crash: the loop device, the FUSE mount, the FUSE directory that Mount made,
// the state file. A state file whose process has exited and nothing left is stale
// (StaleState).
//
// Without a state file, an atrest stack found on the mount point is taken down all
// the same (Unrecorded), a file system of something else is refused (ErrNotAtrest),
// and nothing mounted is ErrNotMounted. A state file that cannot be read fails with
// ErrState. When ctx is done, Unmount stops waiting and fails with ErrInterrupted;
// what it did is consistent, and running it again finishes.
func Unmount(ctx context.Context, mountpoint string, timeout time.Duration) (Unmounted, error) {
	mp, err := AbsMountpoint(mountpoint)
	if err != nil {
		return Unmounted{}, err
	}
	res := Unmounted{Mountpoint: mp}
	st, err := volmount.Inspect(mp)
	if err != nil {
		return res, err
	}
	state, err := ReadState(mp)
	if errors.Is(err, os.ErrNotExist) {
		res.Outcome = Unrecorded
		return res, unmountUnrecorded(st)
	}
	if err != nil {
		return res, mark(err, ErrState)
	}
	res.Server, res.PID = state.NBD, state.PID
	if st.Mounted() && st.File != state.File {
		return res, mark(fmt.Errorf("%s has %s (%s) mounted on it, not the volume 'atrest mount' recorded (%s)", mp, st.Source, st.FSType, state.File), ErrNotAtrest)
	}
	if state.Alive() {
		pctx, cancel := context.WithTimeout(ctx, probeTimeout)
		perr := nbd.Probe(pctx, state.NBD)
		cancel()
		if ctx.Err() != nil {
			return res, mark(fmt.Errorf("interrupted while checking that the NBD server at %s answers; nothing was changed", state.NBD), ErrInterrupted)
		}
		if serverGone(perr) {
			res.Outcome, res.Unreachable = Abandoned, perr
			return res, abandon(ctx, state, st, &res)
		}
		// The file system first, here, so that files still open are a clean refusal
		// that changes nothing.
		if st.Mounted() {
			if err := volmount.Unmount(mp, false); err != nil {
				if errors.Is(err, syscall.EBUSY) {
					return res, mark(err, ErrFilesOpen)
				}
				return res, err
			}
		}
		if err := signalProcess(ctx, state, unix.SIGTERM, timeout); err != nil {
			return res, err
		}
		res.Lost = recordedLoss(mp) // if its Close could not flush
	} else {
		res.Outcome = StaleState
		if left, err := leftBehind(state, st); err != nil || left {
			res.Outcome = CleanedUp
		}
		res.Lost = recordedLoss(mp)
		if st.Mounted() {
			if err := volmount.Unmount(mp, false); err != nil {
				if errors.Is(err, syscall.EBUSY) {
					return res, mark(err, ErrFilesOpen)
				}
				// Its FUSE server is gone: whatever the file system still had to
				// write is lost anyway; take it off.
				if err := volmount.Unmount(mp, true); err != nil {
					return res, err
				}
			}
		}
	}
	// Whatever the process left (it was killed, or died during its teardown).
	if err := volmount.Teardown(state.File); err != nil {
		return res, err
	}
	if err := volmount.UnmountFUSE(state.FUSEDir); err != nil {
		return res, err
	}
	removeFUSEDir(state.FUSEDir)
	return res, removeState(mp)
}

// serverGone tells from nbd.Probe's error whether the NBD server is gone: nothing
// listens, it does not greet in time (hung), or it no longer offers the export. A
// server that accepts the connection and closes it at once is there, refusing
// connections beyond its limits for now: the mount's own connections are not affected.
func serverGone(err error) bool {
	return err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, syscall.ECONNRESET)
}

// leftBehind reports whether anything of the stack of state remains besides its state
// file: the file system, a loop device over its FUSE file, the FUSE mount.
func leftBehind(state *State, st volmount.Stack) (bool, error) {
	if st.Mounted() {
		return true, nil
	}
	loops, err := volmount.LoopsOf(state.File)
	if err != nil || len(loops) > 0 {
		return true, err
	}
	return volmount.IsFUSEMount(state.FUSEDir)
}

// abandon takes down a stack whose NBD server is gone (see Abandoned), without waiting
// for any I/O: the FUSE connection is aborted first, so that nothing stacked on it can
// wait for the server any more.
func abandon(ctx context.Context, state *State, st volmount.Stack, res *Unmounted) error {
	mp := state.Mountpoint
	interrupted := func(err error) error {
		if errors.Is(err, ErrInterrupted) {
			return fmt.Errorf("the NBD server at %s is unreachable; the volume on %s is detached, but %w", state.NBD, mp, err)
		}
		return err
	}
	// Without the FUSE control file system, the connection ends when the last process
	// that holds it, the mount process, exits: have it exit first.
	abortErr := volmount.AbortFUSE(state.FUSEDir)
	if abortErr != nil {
		if err := stopAbandoned(ctx, state, res); err != nil {
			return fmt.Errorf("%w (and %w)", err, abortErr)
		}
	}
	if st.Mounted() {
		if err := volmount.Unmount(mp, true); err != nil {
			return err
		}
	}
	loops, err := volmount.LoopsOf(state.File)
	if err != nil {
		return err
	}
	for _, l := range loops {
		if err := volmount.DetachLazily(l); err != nil {
			return err
		}
	}
	if abortErr == nil {
		if err := stopAbandoned(ctx, state, res); err != nil {
			return interrupted(err)
		}
	}
	res.Lost = recordedLoss(mp)
	// A loop device that the file system released detaches itself (auto-clear), maybe
	// in a kernel work queue; one still held stays until its files are closed.
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if res.Held, err = volmount.LoopsOf(state.File); err != nil || len(res.Held) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if err := volmount.UnmountFUSE(state.FUSEDir); err != nil { // lazily while a loop device holds it
		return err
	}
	removeFUSEDir(state.FUSEDir)
	return removeState(mp)
}

// stopAbandoned has the mount process of s record what it loses and exit (SIGUSR1,
// see Stack.Abandon), and kills it if it does not within abandonWait.
func stopAbandoned(ctx context.Context, s *State, res *Unmounted) error {
	err := signalProcess(ctx, s, unix.SIGUSR1, abandonWait)
	if errors.Is(err, ErrTeardownTimeout) {
		res.Killed = true
		err = signalProcess(ctx, s, unix.SIGKILL, abandonWait)
	}
	return err
}

// unmountUnrecorded handles a mount point without a state file: an atrest stack
// (state lost) is taken down, a mount of something else is refused, nothing at all
// is ErrNotMounted.
func unmountUnrecorded(st volmount.Stack) error {
	switch {
	case !st.Mounted():
		if _, err := os.Lstat(st.Mountpoint); errors.Is(err, os.ErrNotExist) {
			return mark(fmt.Errorf("%s does not exist", st.Mountpoint), ErrNotMounted)
		}
		return mark(fmt.Errorf("nothing is mounted on %s, and no 'atrest mount' of it is recorded", st.Mountpoint), ErrNotMounted)
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

// signalProcess sends sig to the process that serves s and waits for it to exit, for
// at most timeout (ErrTeardownTimeout) or until ctx is done (ErrInterrupted). A
// process that has already exited is fine.
func signalProcess(ctx context.Context, s *State, sig unix.Signal, timeout time.Duration) error {
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
	if err := unix.PidfdSendSignal(pfd, sig, nil, 0); err != nil {
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
		if ctx.Err() != nil {
			return mark(fmt.Errorf("interrupted while waiting for the mount process %d to exit", s.PID), ErrInterrupted)
		}
		if time.Now().After(deadline) {
			return mark(fmt.Errorf("the mount process %d of %s has not finished its teardown", s.PID, s.Mountpoint), ErrTeardownTimeout)
		}
	}
}
