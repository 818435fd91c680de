package fusefs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// fileNode is one exported Device. It keeps no state besides what Mount gave it, so
// every method may run concurrently with every other.
type fileNode struct {
	fs.Inode
	name   string
	dev    blockdev.Device
	size   int64
	logger *slog.Logger
	start  time.Time
	trim   func(file string) bool // Options.TrimHoles
	refuse atomic.Pointer[zeroWindow]
}

// zeroWindow is the range of Server.RefuseZeroRange while it runs.
type zeroWindow struct{ off, end int64 }

// absorbs reports whether a write of data at off is one of zeroes inside the window.
func (w *zeroWindow) absorbs(data []byte, off int64) bool {
	if w == nil || off < w.off || off+int64(len(data)) > w.end {
		return false
	}
	for _, b := range data {
		if b != 0 {
			return false
		}
	}
	return true
}

var (
	_ fs.NodeOpener    = (*fileNode)(nil)
	_ fs.NodeReader    = (*fileNode)(nil)
	_ fs.NodeWriter    = (*fileNode)(nil)
	_ fs.NodeFsyncer   = (*fileNode)(nil)
	_ fs.NodeAllocater = (*fileNode)(nil)
	_ fs.NodeGetattrer = (*fileNode)(nil)
	_ fs.NodeSetattrer = (*fileNode)(nil)
)

// Open hands out no file handle (all state is in the node) and asks for direct I/O:
// no page cache, so no plaintext in it, and reads and writes of any size reach the
// Device unchanged. Parallel direct writes lift the kernel's per-inode write lock.
func (n *fileNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

// Read reads into dest, which go-fuse sized to the request.
func (n *fileNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	c, errno := readSpan(off, len(dest), n.size)
	if errno != 0 || c == 0 {
		return fuse.ReadResultData(nil), errno
	}
	got, err := n.dev.ReadAt(dest[:c], off)
	if err != nil && !(errors.Is(err, io.EOF) && got == c) {
		return nil, n.fail("read", off, int64(c), err)
	}
	return fuse.ReadResultData(dest[:c]), 0
}

// Write writes data, or the part of it that fits before the end.
func (n *fileNode) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	c, errno := writeSpan(off, len(data), n.size)
	if errno != 0 || c == 0 {
		return 0, errno
	}
	if n.refuse.Load().absorbs(data[:c], off) {
		return uint32(c), 0 // see Server.RefuseZeroRange
	}
	if _, err := n.dev.WriteAt(data[:c], off); err != nil {
		return 0, n.fail("write", off, int64(c), err)
	}
	return uint32(c), 0
}

// Fsync makes every write that returned before it durable (fsync and fdatasync alike:
// the file has no metadata worth a distinction).
func (n *fileNode) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	if err := n.dev.Flush(); err != nil {
		return n.fail("flush", 0, 0, err)
	}
	return 0
}

// allocModes are the fallocate modes that the FUSE kernel module passes on.
const allocModes = unix.FALLOC_FL_KEEP_SIZE | unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_ZERO_RANGE

// Allocate implements fallocate(2) on a file whose every byte is always allocated.
func (n *fileNode) Allocate(ctx context.Context, fh fs.FileHandle, off, length uint64, mode uint32) syscall.Errno {
	if mode&^allocModes != 0 {
		return syscall.EOPNOTSUPP
	}
	keepSize := mode&unix.FALLOC_FL_KEEP_SIZE != 0
	start, c, errno := allocSpan(off, length, n.size, keepSize)
	if errno != 0 || c == 0 {
		return errno
	}
	var err error
	switch {
	case mode&unix.FALLOC_FL_PUNCH_HOLE != 0:
		if !keepSize || mode&unix.FALLOC_FL_ZERO_RANGE != 0 {
			return syscall.EINVAL // the kernel refuses these before asking us
		}
		err = n.punchHole(start, c)
	case mode&unix.FALLOC_FL_ZERO_RANGE != 0:
		if n.refuse.Load() != nil {
			return syscall.EOPNOTSUPP // see Server.RefuseZeroRange
		}
		err = blockdev.WriteZeroes(n.dev, start, c, 0)
	default:
		return 0 // already allocated
	}
	if err != nil {
		return n.fail("fallocate", start, c, err)
	}
	return 0
}

// punchHole implements PUNCH_HOLE|KEEP_SIZE, where the Device trims. fallocate(2) promises
// that the range reads back as zeroes, and the kernel relies on it: a loop device turns
// both a discard and a WRITE_ZEROES that allows unmapping (ext4's zeroout of inode
// tables and extents) into this call (measured on Linux 6.18: blkdiscard, fstrim,
// fallocate -p on the loop device and ext4's lazy inode table init all arrive as
// PUNCH_HOLE|KEEP_SIZE; blkdiscard -z and mke2fs's zeroouts as ZERO_RANGE|KEEP_SIZE).
// So it maps to WriteZeroes with ZeroMayUnmap, not to Trim, whose contents afterwards
// are unspecified, unless Options.TrimHoles vouches that the hole is a discard.
// ZeroFast keeps it cheap: a Device that cannot zero without writing (an encrypted one)
// answers ErrNotFast, the request fails with EOPNOTSUPP, Linux 6.18's loop driver turns
// its discards off (queue/discard_max_bytes 0, write-zeroes stay: they fall back to
// writing zero pages), and fstrim says "not supported".
func (n *fileNode) punchHole(off, c int64) error {
	if c := blockdev.CapsOf(n.dev); !c.Trim {
		return fmt.Errorf("punch hole: the device takes no discards: %w", blockdev.ErrNotSupported)
	}
	if n.trim != nil && n.trim(n.name) {
		return blockdev.Trim(n.dev, off, c)
	}
	err := blockdev.WriteZeroes(n.dev, off, c, blockdev.ZeroMayUnmap|blockdev.ZeroFast)
	if errors.Is(err, blockdev.ErrNotFast) {
		return fmt.Errorf("punch hole: %w", blockdev.ErrNotSupported)
	}
	return err
}

// Getattr reports the fixed size, root ownership and mode 0600.
func (n *fileNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.attr(&out.Attr)
	return 0
}

// Setattr refuses changes of size (except to the same size), owner and mode; it
// accepts and ignores new times, which nothing depends on.
func (n *fileNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && sz != uint64(n.size) {
		if sz > uint64(n.size) {
			return syscall.EFBIG
		}
		return syscall.EPERM
	}
	if _, ok := in.GetMode(); ok {
		return syscall.EPERM
	}
	if _, ok := in.GetUID(); ok {
		return syscall.EPERM
	}
	if _, ok := in.GetGID(); ok {
		return syscall.EPERM
	}
	n.attr(&out.Attr)
	return 0
}

func (n *fileNode) attr(a *fuse.Attr) {
	a.Mode = 0o600
	a.Nlink = 1
	a.Size = uint64(n.size)
	a.Blocks = (uint64(n.size) + 511) / 512
	a.Blksize = uint32(max(4096, blockdev.PreferredBlockSize(n.dev)))
	a.SetTimes(&n.start, &n.start, &n.start)
}

// fail logs a Device error and turns it into the errno of the request: the one the
// block layer uses for its class (blk_errors in the kernel's block/blk-core.c), so that
// a loop device over the file passes the class on.
func (n *fileNode) fail(op string, off, length int64, err error) syscall.Errno {
	errno := syscall.EIO // ErrMedium, and errors without a class
	switch {
	case errors.Is(err, blockdev.ErrNotSupported):
		return syscall.EOPNOTSUPP // a missing capability is no I/O error: not logged
	case errors.Is(err, blockdev.ErrReadOnly):
		errno = syscall.EROFS
	case errors.Is(err, blockdev.ErrGone):
		errno = syscall.ENODEV
	case errors.Is(err, blockdev.ErrTimeout):
		errno = syscall.ETIMEDOUT
	}
	n.logger.Error("device error", "file", n.name, "op", op, "offset", off, "length", length, "err", err, "errno", errno.Error())
	return errno
}
