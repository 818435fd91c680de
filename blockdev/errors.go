package blockdev

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// The error classes. Every error of a Device that a layer above can act on wraps one
// of them, found with errors.Is, and keeps its cause (an errno, an NBD error) wrapped
// beside it, so both match:
//
//	read /dev/sdb at offset 4096: medium error: input/output error
//
// Each layer passes the class of the error below it on unchanged (see the package doc).
var (
	// ErrGone says that the device is no longer there: a pulled drive (ENODEV, ENXIO),
	// a transport that shut down (ESHUTDOWN, ENOTCONN of an aborted FUSE file), a
	// vanished Faulty, an NBD client whose reconnect window passed. Every later call
	// is expected to fail the same way until the device comes back, if it does.
	ErrGone = errors.New("device gone")
	// ErrMedium says that the device is there but failed this request (EIO, EILSEQ,
	// ENODATA, EBADMSG, EREMOTEIO, an NBD server's EIO): other ranges may still work,
	// and the same range may work on another copy. A drive that has just been pulled
	// often answers EIO first; telling the two apart takes a probe later.
	ErrMedium = errors.New("medium error")
	// ErrTimeout says that a call bounded in time (see Bound) did not return within its
	// limit; the call may still be running below. A block device's own ETIMEDOUT is
	// the same class.
	ErrTimeout = errors.New("device did not answer in time")
	// ErrOutOfRange is returned for an access that does not fit in the device.
	ErrOutOfRange = errors.New("access outside the device")
	// ErrNotSupported is returned for a capability the device does not have.
	ErrNotSupported = errors.New("operation not supported by the device")
	// ErrNotFast is returned by WriteZeroes with ZeroFast when zeroing would be no faster
	// than writing zeroes. It is no failure of the device, and belongs to no class.
	ErrNotFast = errors.New("fast zeroing not possible")
	// ErrClosed is returned for any call on a closed device.
	ErrClosed = errors.New("device is closed")
	// ErrReadOnly is returned for a change to a read-only device.
	ErrReadOnly = errors.New("device is read-only")
	// ErrInUse is returned by OpenFile with Exclusive when another opener holds the
	// drive (see FileOptions.Exclusive). It belongs to no class: the device is fine.
	ErrInUse = errors.New("device is in use")
)

// errnoClasses are the errnos whose class Classify knows. The block layer returns
// ENODEV for a device gone offline, ENODATA for a medium error, EILSEQ for a failed
// integrity check, EREMOTEIO for a target error and ETIMEDOUT for a request that timed
// out (blk_errors in the kernel's block/blk-core.c).
var errnoClasses = map[unix.Errno]error{
	unix.ENODEV:    ErrGone,
	unix.ENXIO:     ErrGone,
	unix.ESHUTDOWN: ErrGone,
	unix.ENOTCONN:  ErrGone,
	unix.EIO:       ErrMedium,
	unix.EILSEQ:    ErrMedium,
	unix.ENODATA:   ErrMedium,
	unix.EBADMSG:   ErrMedium,
	unix.EREMOTEIO: ErrMedium,
	unix.ETIMEDOUT: ErrTimeout,
}

// Classify returns err wrapped with its class, when err carries an errno that has one
// (see ErrGone, ErrMedium, ErrTimeout) and no class yet; otherwise err itself. The
// result matches both the class and the errno with errors.Is.
func Classify(err error) error {
	var errno unix.Errno
	if err == nil || !errors.As(err, &errno) || hasClass(err) {
		return err
	}
	if class := errnoClasses[errno]; class != nil {
		return fmt.Errorf("%w: %w", class, err)
	}
	return err
}

// hasClass reports whether err already wraps one of the error classes.
func hasClass(err error) bool {
	for _, c := range [...]error{ErrGone, ErrMedium, ErrTimeout, ErrOutOfRange, ErrNotSupported, ErrClosed, ErrReadOnly} {
		if errors.Is(err, c) {
			return true
		}
	}
	return false
}
