package blockdev

// The kernel does not give short reads, short writes or EINTR on a regular file of a
// disk file system, but it passes on whatever a FUSE server answers to a file opened
// with FOPEN_DIRECT_IO. This test serves such a file whose server answers short and
// with EINTR, and checks that File goes on until it has moved every byte, with the
// real system calls (the hook only counts what they return).

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/internal/testutil"
)

// stingyNode is a FUSE file that moves at most chunk bytes per request and answers
// every third request with EINTR.
type stingyNode struct {
	fs.Inode
	chunk int
	mu    sync.Mutex
	data  []byte
	calls atomic.Int64
}

var (
	_ fs.NodeOpener    = (*stingyNode)(nil)
	_ fs.NodeGetattrer = (*stingyNode)(nil)
	_ fs.NodeReader    = (*stingyNode)(nil)
	_ fs.NodeWriter    = (*stingyNode)(nil)
	_ fs.NodeFsyncer   = (*stingyNode)(nil)
)

func (n *stingyNode) Open(context.Context, uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (n *stingyNode) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.mu.Lock()
	defer n.mu.Unlock()
	out.Mode = syscall.S_IFREG | 0o600
	out.Size = uint64(len(n.data))
	return 0
}

func (n *stingyNode) interrupt() bool { return n.calls.Add(1)%3 == 0 }

func (n *stingyNode) Read(_ context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if n.interrupt() {
		return nil, syscall.EINTR
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if off >= int64(len(n.data)) {
		return fuse.ReadResultData(nil), 0
	}
	c := copy(dest[:min(len(dest), n.chunk)], n.data[off:])
	return fuse.ReadResultData(dest[:c]), 0
}

func (n *stingyNode) Write(_ context.Context, _ fs.FileHandle, p []byte, off int64) (uint32, syscall.Errno) {
	if n.interrupt() {
		return 0, syscall.EINTR
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if off+int64(len(p)) > int64(len(n.data)) {
		return 0, syscall.EFBIG
	}
	c := copy(n.data[off:], p[:min(len(p), n.chunk)])
	return uint32(c), 0
}

func (n *stingyNode) Fsync(context.Context, fs.FileHandle, uint32) syscall.Errno { return 0 }

// mountStingy serves a stingyNode of size bytes and returns its path.
func mountStingy(t *testing.T, node *stingyNode) string {
	t.Helper()
	testutil.Root(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testutil.Unavailable(t, "no /dev/fuse: %v", err)
	}
	dir := t.TempDir()
	root := &fs.Inode{}
	srv, err := fs.Mount(dir, root, &fs.Options{
		MountOptions: fuse.MountOptions{DirectMountStrict: true, FsName: "atrest-blockdev-test", MaxWrite: 1 << 20},
		OnAdd: func(ctx context.Context) {
			root.AddChild("drive", root.NewPersistentInode(ctx, node, fs.StableAttr{Mode: syscall.S_IFREG}), true)
		},
	})
	if err != nil {
		testutil.Unavailable(t, "mount FUSE on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return filepath.Join(dir, "drive")
}

func TestFileRealShortTransfersAndEINTR(t *testing.T) {
	const size = 1 << 20
	node := &stingyNode{chunk: 3000, data: make([]byte, size)}
	path := mountStingy(t, node)
	f, err := OpenFile(path, FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Size() != size {
		t.Fatalf("Size = %d, want %d", f.Size(), size)
	}

	// Count what the real system calls return.
	var shortReads, shortWrites, eintr atomic.Int64
	f.sys.pread = func(fd int, p []byte, off int64) (int, error) {
		n, err := unix.Pread(fd, p, off)
		if errors.Is(err, unix.EINTR) {
			eintr.Add(1)
		} else if err == nil && n < len(p) {
			shortReads.Add(1)
		}
		return n, err
	}
	f.sys.pwrite = func(fd int, p []byte, off int64) (int, error) {
		n, err := unix.Pwrite(fd, p, off)
		if errors.Is(err, unix.EINTR) {
			eintr.Add(1)
		} else if err == nil && n < len(p) {
			shortWrites.Add(1)
		}
		return n, err
	}

	r := rand.New(rand.NewPCG(8, 9))
	model := make([]byte, size)
	for i := range 50 {
		off := r.Int64N(size - 100000)
		p := make([]byte, 1+r.IntN(100000))
		for j := range p {
			p[j] = byte(r.Uint32())
		}
		if n, err := f.WriteAt(p, off); err != nil || n != len(p) {
			t.Fatalf("write %d: %d bytes at %d: %d, %v", i, len(p), off, n, err)
		}
		copy(model[off:], p)
		lo, hi := max(0, off-2500), min(size, off+int64(len(p))+2500)
		got := make([]byte, hi-lo)
		if n, err := f.ReadAt(got, lo); err != nil || n != len(got) {
			t.Fatalf("read %d: %d, %v", i, n, err)
		}
		if !bytes.Equal(got, model[lo:hi]) {
			t.Fatalf("read %d: wrong data", i)
		}
	}
	got := make([]byte, size)
	if n, err := f.ReadAt(got, 0); err != nil || n != size {
		t.Fatalf("read all: %d, %v", n, err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("the drive differs from the model")
	}
	node.mu.Lock()
	same := bytes.Equal(node.data, model)
	node.mu.Unlock()
	if !same {
		t.Fatal("the FUSE server holds something else than the model")
	}
	if shortReads.Load() == 0 || shortWrites.Load() == 0 || eintr.Load() == 0 {
		t.Fatalf("the kernel returned %d short reads, %d short writes, %d EINTR: want some of each",
			shortReads.Load(), shortWrites.Load(), eintr.Load())
	}
	t.Logf("real short reads %d, short writes %d, EINTR %d", shortReads.Load(), shortWrites.Load(), eintr.Load())
}
