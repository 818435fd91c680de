package drivebay

import (
	"context"
	"errors"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// driveNode is one inserted drive: a file of the bay passed through to its backing
// file. Its methods serve FUSE requests; they touch only the backing file.
type driveNode struct {
	fs.Inode
	ino uint64

	// mu is held shared by every request that uses fd, exclusively to change state.
	mu    sync.RWMutex
	fd    int           // the backing file; -1 once pulled
	size  int64         // last known size, reported after a pull
	errno syscall.Errno // what every request gets once pulled; 0 while present
	hang  chan struct{} // PullHang: requests wait until it is closed
	bad   []*badRange   // FailRange
}

type badRange struct{ off, end int64 }

var (
	_ fs.NodeOpener    = (*driveNode)(nil)
	_ fs.NodeReader    = (*driveNode)(nil)
	_ fs.NodeWriter    = (*driveNode)(nil)
	_ fs.NodeFsyncer   = (*driveNode)(nil)
	_ fs.NodeAllocater = (*driveNode)(nil)
	_ fs.NodeGetattrer = (*driveNode)(nil)
	_ fs.NodeSetattrer = (*driveNode)(nil)
)

// acquire waits while the drive hangs, and returns the backing descriptor with mu
// held shared (the caller calls mu.RUnlock), or the errno of a pulled drive or of a
// medium error on [off, off+n) (n < 0: no range).
func (n *driveNode) acquire(ctx context.Context, off, length int64) (int, syscall.Errno) {
	for {
		n.mu.RLock()
		hang := n.hang
		if hang == nil {
			if errno := n.errno; errno != 0 {
				n.mu.RUnlock()
				return -1, errno
			}
			for _, r := range n.bad {
				if length >= 0 && off < r.end && r.off < off+length {
					n.mu.RUnlock()
					return -1, syscall.EIO
				}
			}
			return n.fd, 0
		}
		n.mu.RUnlock()
		select {
		case <-hang:
		case <-ctx.Done(): // the kernel interrupted the request
			return -1, syscall.EINTR
		}
	}
}

// pull makes every request from now on fail with errno, or wait first (hang) until
// release. It waits for the requests using the backing file, then closes it.
func (n *driveNode) pull(errno syscall.Errno, hang bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.errno == 0 {
		n.errno = errno
	}
	if hang && n.hang == nil {
		n.hang = make(chan struct{})
	}
	if n.fd >= 0 {
		unix.Close(n.fd)
		n.fd = -1
	}
}

// release lets the requests that wait on a hanging drive go (to fail).
func (n *driveNode) release() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.hang != nil {
		close(n.hang)
		n.hang = nil
	}
}

func (n *driveNode) failRange(off, length int64) (heal func()) {
	r := &badRange{off: off, end: off + length}
	n.mu.Lock()
	n.bad = append(n.bad, r)
	n.mu.Unlock()
	return func() {
		n.mu.Lock()
		defer n.mu.Unlock()
		for i, b := range n.bad {
			if b == r {
				n.bad = append(n.bad[:i], n.bad[i+1:]...)
				return
			}
		}
	}
}

// Open asks for direct I/O: no page cache of the slot's file, so every read and write
// of a loop device over it reaches the backing file, and a pull is seen at once.
func (n *driveNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if _, errno := n.acquire(ctx, 0, -1); errno != 0 {
		return nil, 0, errno
	}
	n.mu.RUnlock()
	return nil, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

func (n *driveNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	fd, errno := n.acquire(ctx, off, int64(len(dest)))
	if errno != 0 {
		return nil, errno
	}
	defer n.mu.RUnlock()
	done := 0
	for done < len(dest) {
		c, err := unix.Pread(fd, dest[done:], off+int64(done))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, fs.ToErrno(err)
		}
		if c == 0 {
			break
		}
		done += c
	}
	return fuse.ReadResultData(dest[:done]), 0
}

func (n *driveNode) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	fd, errno := n.acquire(ctx, off, int64(len(data)))
	if errno != 0 {
		return 0, errno
	}
	defer n.mu.RUnlock()
	done := 0
	for done < len(data) {
		c, err := unix.Pwrite(fd, data[done:], off+int64(done))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, fs.ToErrno(err)
		}
		done += c
	}
	return uint32(done), 0
}

// Fsync makes the backing file's data durable (fdatasync: the file's metadata does
// not matter to a drive).
func (n *driveNode) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	fd, errno := n.acquire(ctx, 0, -1)
	if errno != 0 {
		return errno
	}
	defer n.mu.RUnlock()
	return fs.ToErrno(unix.Fdatasync(fd))
}

// Allocate passes fallocate through with its mode: a loop device sends
// PUNCH_HOLE|KEEP_SIZE for discards and ZERO_RANGE|KEEP_SIZE for write-zeroes.
func (n *driveNode) Allocate(ctx context.Context, fh fs.FileHandle, off, length uint64, mode uint32) syscall.Errno {
	fd, errno := n.acquire(ctx, int64(off), int64(length))
	if errno != 0 {
		return errno
	}
	defer n.mu.RUnlock()
	return fs.ToErrno(unix.Fallocate(fd, mode, int64(off), int64(length)))
}

func (n *driveNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.fd >= 0 {
		var st unix.Stat_t
		if err := unix.Fstat(n.fd, &st); err != nil {
			return fs.ToErrno(err)
		}
		n.size = st.Size
	}
	n.attr(&out.Attr)
	return 0
}

// Setattr passes a size change through (ftruncate) and accepts and ignores times;
// the owner and mode cannot change.
func (n *driveNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if _, ok := in.GetMode(); ok {
		return syscall.EPERM
	}
	if _, ok := in.GetUID(); ok {
		return syscall.EPERM
	}
	if _, ok := in.GetGID(); ok {
		return syscall.EPERM
	}
	if sz, ok := in.GetSize(); ok {
		fd, errno := n.acquire(ctx, 0, -1)
		if errno != 0 {
			return errno
		}
		err := unix.Ftruncate(fd, int64(sz))
		n.mu.RUnlock()
		if err != nil {
			return fs.ToErrno(err)
		}
	}
	return n.Getattr(ctx, nil, out)
}

var start = time.Now()

func (n *driveNode) attr(a *fuse.Attr) {
	a.Mode = syscall.S_IFREG | 0o600
	a.Nlink = 1
	a.Size = uint64(n.size)
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = 4096
	a.SetTimes(&start, &start, &start)
}

// rootNode is the bay's directory; go-fuse serves its lookups and listings from the
// children that the Bay adds and removes.
type rootNode struct{ fs.Inode }

var _ fs.NodeStatfser = (*rootNode)(nil)

// Statfs reports a 4 KiB block size, which a loop device takes as its discard
// granularity.
func (r *rootNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	*out = fuse.StatfsOut{Bsize: 4096, Frsize: 4096, NameLen: 255}
	return 0
}
