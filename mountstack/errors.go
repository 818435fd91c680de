package mountstack

import (
	"errors"
	"slices"

	"github.com/atrest/atrest/volmount"
)

// Sentinel errors, for callers that must tell failures apart (the atrest command maps
// them to exit codes and hints). An error of this package matches them with errors.Is;
// its message is that of the underlying error, which names the mount point, device or
// server concerned.
var (
	// ErrBusy: something of the stack is in use, or could not be taken off. Every
	// error below up to ErrTeardownTimeout matches it as well.
	ErrBusy = errors.New("in use")
	// ErrMounted: Mount found a file system already mounted on the mount point.
	ErrMounted = errors.New("the mount point already has a file system mounted on it")
	// ErrServed: Mount found a live process that already serves the mount point.
	ErrServed = errors.New("the mount point is already served")
	// ErrLeftBehind: Mount found the FUSE mount of a crashed process that served the
	// mount point; Unmount cleans up after it.
	ErrLeftBehind = errors.New("a crashed mount left its FUSE mount behind")
	// ErrFUSEDirInUse: the FUSE directory chosen is already a FUSE mount of atrest.
	ErrFUSEDirInUse = errors.New("the FUSE directory is already in use")
	// ErrVolumeHeld: the NBD server refused write access: another writer holds the
	// volume (nbd.ErrVolumeBusy); the message says which and since when.
	ErrVolumeHeld = errors.New("another writer holds the volume")
	// ErrVolumeMounted: this node already has the volume mounted elsewhere, by a live
	// atrest mount (same NBD address and export, or the same volume identity under
	// another export name); the message names the other mount point.
	ErrVolumeMounted = errors.New("the volume is already mounted on this node")
	// ErrFilesOpen: files are open on the volume. Unmount changed nothing; Close
	// detached the file system lazily and gave up waiting for them (its context was
	// done), leaving the FUSE mount to serve them.
	ErrFilesOpen = errors.New("files are open on the volume")
	// ErrTeardownTimeout: Unmount waited in vain for the process that serves the
	// mount point to finish its teardown.
	ErrTeardownTimeout = errors.New("the mount process has not finished its teardown")

	// ErrNotAtrest: Unmount found a file system mounted on the mount point that is
	// not the one Mount set up there.
	ErrNotAtrest = errors.New("not a mount of atrest")
	// ErrNotMounted: Unmount found nothing mounted on the mount point (or no such
	// path) and no state file of atrest's for it.
	ErrNotMounted = errors.New("not mounted")
	// ErrInterrupted: Unmount's context was done before it finished; what it did is
	// consistent, and running Unmount again finishes the work.
	ErrInterrupted = errors.New("interrupted")
	// ErrState: the state file of the mount point exists but cannot be read.
	ErrState = errors.New("the state file cannot be read")
	// ErrUnreachable: Mount could not connect to the NBD server (or was cancelled
	// while it tried).
	ErrUnreachable = errors.New("the nbd server is unreachable")
	// ErrUnknownExport: the NBD server has no export of the name asked for.
	ErrUnknownExport = errors.New("no such export")
	// ErrNotEmpty: the volume holds something other than the file system asked for,
	// which is never formatted over. It is volmount.ErrNotEmpty.
	ErrNotEmpty = volmount.ErrNotEmpty
	// ErrUnsupportedFS: the volume holds nothing and the file system type asked for
	// cannot be created (only ext4 is).
	ErrUnsupportedFS = errors.New("the file system type cannot be created")
	// ErrFlush: the NBD client failed to flush or to close: writes may not have
	// reached the server.
	ErrFlush = errors.New("the nbd client failed to flush")
)

// kindError gives err the kinds it matches without changing its message.
type kindError struct {
	err   error
	kinds []error
}

func (e *kindError) Error() string        { return e.err.Error() }
func (e *kindError) Unwrap() error        { return e.err }
func (e *kindError) Is(target error) bool { return slices.Contains(e.kinds, target) }

// mark makes err match kinds as well; a nil err stays nil. The busy kinds also match
// ErrBusy.
func mark(err error, kinds ...error) error {
	if err == nil {
		return nil
	}
	e := &kindError{err: err, kinds: slices.Clone(kinds)}
	for _, k := range kinds {
		switch k {
		case ErrMounted, ErrServed, ErrLeftBehind, ErrFUSEDirInUse, ErrVolumeHeld, ErrVolumeMounted, ErrFilesOpen, ErrTeardownTimeout:
			e.kinds = append(e.kinds, ErrBusy)
		}
	}
	return e
}
