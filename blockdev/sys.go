package blockdev

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sysCalls are the system calls File makes on its descriptor. Every File holds its own
// copy, which the package's tests replace on one File to inject what the kernel does not
// do on demand (short transfers and EINTR on regular files and block devices,
// EOPNOTSUPP on file systems that support everything). Nothing else changes it.
type sysCalls struct {
	pread     func(fd int, p []byte, off int64) (int, error)
	pwrite    func(fd int, p []byte, off int64) (int, error)
	pwritev2  func(fd int, iovs [][]byte, off int64, flags int) (int, error)
	fallocate func(fd int, mode uint32, off, n int64) error
	fdatasync func(fd int) error
	// ioctlRange issues BLKDISCARD or BLKZEROOUT over [off, off+n).
	ioctlRange func(fd int, req uint, off, n int64) error
}

// realSys are the system calls of the kernel.
var realSys = sysCalls{
	pread:      unix.Pread,
	pwrite:     unix.Pwrite,
	pwritev2:   unix.Pwritev2,
	fallocate:  unix.Fallocate,
	fdatasync:  unix.Fdatasync,
	ioctlRange: ioctlRange,
}

// ioctlRange issues an ioctl that takes a {start, length} pair of uint64 in bytes, as
// BLKDISCARD and BLKZEROOUT do.
func ioctlRange(fd int, req uint, off, n int64) error {
	r := [2]uint64{uint64(off), uint64(n)}
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&r)))
	if e != 0 {
		return e
	}
	return nil
}

// retryEINTR calls fn until it fails with something other than EINTR.
func retryEINTR(fn func() error) error {
	for {
		err := fn()
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// isNotSupported reports whether err is the kernel saying that the file system or the
// device cannot do the operation.
func isNotSupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.ENOSYS)
}

// queueLimit returns the queue limit name (such as write_zeroes_max_bytes: the block
// device does WRITE_ZEROES itself, so BLKZEROOUT does not fall back to writing pages of
// zeroes) of the block device rdev from sysfs, or 0 when it cannot tell.
func queueLimit(rdev uint64, name string) uint64 {
	dir := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(rdev), unix.Minor(rdev))
	queue := dir + "/queue"
	if _, err := os.Stat(dir + "/partition"); err == nil {
		queue = dir + "/../queue"
	}
	b, err := os.ReadFile(queue + "/" + name)
	if err != nil {
		return 0
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0
	}
	return v
}
