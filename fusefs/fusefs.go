// Package fusefs exposes blockdev.Devices as fixed-size regular files in a FUSE directory,
// so that a loop device (and a file system on it) can sit on top of any atrest layer.
//
// Every file is opened with FOPEN_DIRECT_IO, so no plaintext ever enters the page cache
// of the FUSE file: each read and write reaches the Device as ReadAt/WriteAt. The files
// never grow or shrink; fsync maps to Flush, and fallocate to the Device's zeroing and
// trimming capabilities (see Mount for the exact mapping).
//
// Discards through a loop device. A loop device over a file sends both its discards and
// its WRITE_ZEROES that may unmap (ext4's lazy inode table init, extent zeroouts) as
// fallocate PUNCH_HOLE|KEEP_SIZE; only WRITE_ZEROES with NOUNMAP (blkdiscard -z,
// mke2fs) arrives as ZERO_RANGE|KEEP_SIZE (measured on Linux 6.18, where the block
// layer also refuses FALLOC_FL_WRITE_ZEROES on a loop device: its
// write_zeroes_unmap_max_hw_bytes is 0). A punched hole must read back as zeroes, and a
// trimmed range of an encrypted Device reads back as noise, so by default a hole is an
// unmapping zeroing, which an encrypted Device refuses (then the loop device turns its
// discards off). Holes are refused at once where the Device's Caps do not say Trim: it
// takes no discards (an encrypted drive whose header does not allow them), so it learns
// nothing of which blocks are free. Linux 6.18's loop driver turns write-zeroes off for
// good, keeping discards, when its file answers ZERO_RANGE with EOPNOTSUPP; the block
// layer then zeroes by writing zero pages, and every punched hole left is a discard.
// Server.RefuseZeroRange provokes that without changing a byte, and Options.TrimHoles
// lets holes through as trims while the caller sees write-zeroes off (`atrest mount`
// does both when the export offers trims).
//
// Errors: a Device error fails the request with the errno the block layer uses for its
// class (blockdev.ErrGone ENODEV, ErrTimeout ETIMEDOUT, ErrMedium and any other EIO;
// ErrReadOnly EROFS, ErrNotSupported EOPNOTSUPP), so a loop device over the file
// reports a gone Device as offline (BLK_STS_OFFLINE) rather than as a medium error.
//
// Concurrency: Mount may be called from several goroutines for different directories.
// A Server's methods (Dir, Path, Wait, Unmount) are safe for concurrent use. The
// Devices are called from many goroutines at once, as blockdev.Device requires. The
// process that serves a mount must never access that mount from a goroutine that
// serves FUSE requests (no Device method may touch the FUSE file or anything stacked on
// it, like its loop device), or the kernel waits for a reply that can never come.
package fusefs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// DefaultRoot is the directory under which atrest mounts its FUSE directories, one per
// `atrest mount` (DefaultRoot/<name>).
const DefaultRoot = "/run/atrest/fuse"

// Defaults of Options.
const (
	// DefaultMaxWrite is the largest read or write the kernel sends in one request (it
	// also sets max_read). 1 MiB is the kernel's cap (fs.fuse.max_pages_limit = 256).
	DefaultMaxWrite = 1 << 20
	// DefaultMaxBackground bounds the asynchronous requests the kernel keeps in flight
	// (readahead, and every direct I/O that arrives through aio, io_uring or a loop
	// device). It must exceed the queue depth that callers use, or requests queue in
	// the kernel.
	DefaultMaxBackground = 128
)

// File is one export: a name in the FUSE directory and the Device behind it.
type File struct {
	Name   string
	Device blockdev.Device
}

// Options tune a mount. The zero value is ready to use.
type Options struct {
	// Logger receives Device errors (each one also fails its request with EIO) and
	// go-fuse's diagnostics. Nil discards them.
	Logger *slog.Logger
	// MaxWrite is the largest request size in bytes; 0 means DefaultMaxWrite.
	MaxWrite int
	// MaxBackground bounds the asynchronous requests in flight; 0 means
	// DefaultMaxBackground.
	MaxBackground int
	// FsName is shown as the source in /proc/self/mountinfo; "" means "atrest".
	FsName string
	// TrimHoles, when set, is asked for each punched hole in a file whose Device's Caps
	// say Trim whether the hole is a discard: then it reaches the Device as Trim, after
	// which the range reads back as whatever the Device holds (noise on an encrypted
	// one), not as zeroes.
	// The caller vouches for it: it returns true only while nothing can send the file
	// a punched hole that must read back as zeroes. A loop device sends both its
	// discards and its unmapping WRITE_ZEROES as punched holes, so `atrest mount`
	// returns true only while every loop device over the file has write-zeroes turned
	// off (queue/write_zeroes_max_bytes 0; see Server.RefuseZeroRange). It is called
	// from the goroutines that serve FUSE, so it must not touch the mount.
	TrimHoles func(file string) bool
	// Debug logs every FUSE request to Logger at debug level.
	Debug bool
}

// Server is a mounted FUSE directory that serves its files until it is unmounted.
type Server struct {
	srv   *fuse.Server
	dir   string
	files map[string]*fileNode
	done  chan struct{} // closed when the serve loop has ended
	mu    sync.Mutex    // serializes Unmount (go-fuse's is not safe for concurrent use)
}

// Mount mounts a FUSE file system at dir (created with mode 0700 if missing) that holds
// one regular file, mode 0600 and owned by root, per element of files, and serves it
// until Unmount, or until someone else unmounts dir. It returns once the kernel has
// answered the first request, so the files are usable at once. It needs root
// (mount(2) directly, no fusermount). The Devices stay open; the caller closes them
// after Wait returns.
//
// Each file maps requests to its Device as follows:
//   - read: ReadAt; a read at or after the end returns 0 bytes, one that crosses it
//     returns the bytes before the end;
//   - write: WriteAt; a write at or after the end fails with ENOSPC, one that crosses
//     it writes the bytes that fit and returns a short count (as a block device does);
//   - fsync and fdatasync: Flush;
//   - fallocate without flags or with KEEP_SIZE: nothing to do inside the file, EFBIG
//     beyond its end without KEEP_SIZE;
//   - fallocate ZERO_RANGE: blockdev.WriteZeroes without ZeroMayUnmap;
//   - fallocate PUNCH_HOLE|KEEP_SIZE: where the Device's Caps say Trim (asked at each
//     hole), blockdev.WriteZeroes with ZeroMayUnmap|ZeroFast, EOPNOTSUPP when the
//     Device answers ErrNotFast; not Trim, since a punched hole must read back as
//     zeroes and a loop device sends its WRITE_ZEROES this way too, unless
//     Options.TrimHoles says that the hole is a discard (then blockdev.Trim).
//     Where the Caps do not say Trim, EOPNOTSUPP;
//   - setattr: the size cannot change (EFBIG to grow, EPERM to shrink, also for
//     open(O_TRUNC)), nor the owner or mode (EPERM); times are accepted and ignored.
//
// Any other Device error fails the request with the errno of its class (see the
// package doc; EIO without one) and is logged.
func Mount(dir string, files []File, opts Options) (*Server, error) {
	if len(files) == 0 {
		return nil, errors.New("fusefs: no files to serve")
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	names := make(map[string]bool, len(files))
	for _, f := range files {
		if err := CheckName(f.Name); err != nil {
			return nil, err
		}
		if names[f.Name] {
			return nil, fmt.Errorf("fusefs: file name %q given twice", f.Name)
		}
		if f.Device == nil {
			return nil, fmt.Errorf("fusefs: file %q has no device", f.Name)
		}
		names[f.Name] = true
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("fusefs: %w", err)
	}
	// A dead FUSE mount left by a killed server answers ENOTCONN.
	if _, err := os.Stat(dir); errors.Is(err, syscall.ENOTCONN) {
		return nil, fmt.Errorf("fusefs: %s is a dead FUSE mount (its server is gone); unmount it first: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("fusefs: %w", err)
	}

	maxWrite := opts.MaxWrite
	if maxWrite == 0 {
		maxWrite = DefaultMaxWrite
	}
	maxBackground := opts.MaxBackground
	if maxBackground == 0 {
		maxBackground = DefaultMaxBackground
	}
	fsName := opts.FsName
	if fsName == "" {
		fsName = "atrest"
	}
	// Attributes never change behind the kernel's back: sizes are fixed.
	timeout := time.Hour
	root := &rootNode{start: time.Now(), blockSize: statfsBlockSize(files)}
	byName := make(map[string]*fileNode, len(files))
	for _, f := range files {
		n := &fileNode{
			name:   f.Name,
			dev:    f.Device,
			size:   f.Device.Size(),
			logger: logger,
			start:  root.start,
			trim:   opts.TrimHoles,
		}
		root.files = append(root.files, n)
		byName[f.Name] = n
	}
	goFuseLog := slog.NewLogLogger(logger.Handler(), slog.LevelWarn)
	fsOpts := &fs.Options{
		MountOptions: fuse.MountOptions{
			FsName:        fsName,
			Name:          "atrest",
			MaxWrite:      maxWrite,
			MaxBackground: maxBackground,
			// Direct I/O from aio, io_uring and loop devices stays asynchronous
			// (otherwise each submitter waits for its request before the next).
			ExtraCapabilities: fuse.CAP_ASYNC_DIO,
			// mount(2) ourselves, as root: no fusermount, no fallback.
			DirectMountStrict: true,
			DirectMountFlags:  syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_NOEXEC,
			DisableXAttrs:     true,
			// Read replies are Go memory (decrypted buffers): splicing them would copy
			// them into a pipe and out again, and go-fuse cannot grow the pipe past
			// fs.pipe-max-size (1 MiB by default) for a 1 MiB read and its header,
			// so every such read failed the splice and logged a warning.
			DisableSplice: true,
			Debug:         opts.Debug,
			Logger:        slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
		},
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		Logger:          goFuseLog,
	}
	if !opts.Debug {
		fsOpts.MountOptions.Logger = goFuseLog
	}
	srv, err := fuse.NewServer(fs.NewNodeFS(root, fsOpts), dir, &fsOpts.MountOptions)
	if err != nil {
		if os.Geteuid() != 0 {
			return nil, fmt.Errorf("fusefs: mount %s (it needs root): %w", dir, err)
		}
		return nil, fmt.Errorf("fusefs: mount %s: %w", dir, err)
	}
	// go-fuse opens /dev/fuse without O_CLOEXEC on the direct-mount path; a child
	// process (mkfs, mount, ...) would inherit it and keep the FUSE connection alive
	// after this process dies.
	if err := CloseOnExecFUSE(); err != nil {
		_ = srv.Unmount()
		return nil, fmt.Errorf("fusefs: %w", err)
	}
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		_ = srv.Unmount()
		return nil, fmt.Errorf("fusefs: mount %s: waiting for the kernel: %w", dir, err)
	}
	s := &Server{srv: srv, dir: dir, files: byName, done: make(chan struct{})}
	go func() { srv.Wait(); close(s.done) }()
	return s, nil
}

// Dir returns the absolute path of the mounted directory.
func (s *Server) Dir() string { return s.dir }

// Path returns the path of the named file, or "" if the Server has no such file.
func (s *Server) Path(name string) string {
	if s.files[name] == nil {
		return ""
	}
	return filepath.Join(s.dir, name)
}

// RefuseZeroRange runs fn while the named file answers every fallocate ZERO_RANGE with
// EOPNOTSUPP, without reaching its Device, and acknowledges without writing them the
// writes of zeroes that lie inside [off, off+n). It exists to turn write-zeroes off on
// a loop device over the file without changing a byte: fn zeroes [off, off+n) through
// the loop device (BLKZEROOUT); the loop device's WRITE_ZEROES arrives as ZERO_RANGE,
// is refused, and Linux 6.18's loop driver then sets its write_zeroes_max_bytes to 0
// for good (discards stay on); the block layer falls back to writing zero pages, which
// this drops. From then on every punched hole from that loop device is a discard. The
// caller checks the queue limit afterwards (another kernel may behave otherwise) and
// must make sure nothing else writes to the range while fn runs (before anything uses
// the loop device). It fails if the Server has no such file.
func (s *Server) RefuseZeroRange(name string, off, n int64, fn func() error) error {
	f := s.files[name]
	if f == nil {
		return fmt.Errorf("fusefs: no file %q", name)
	}
	f.refuse.Store(&zeroWindow{off: off, end: off + n})
	defer f.refuse.Store(nil)
	return fn()
}

// Wait returns when the mount has ended (Unmount, or umount(8) from outside) and no
// request is being served any more.
func (s *Server) Wait() { <-s.done }

// Done returns a channel that is closed when the serve loop has ended (what Wait
// waits for), for a select.
func (s *Server) Done() <-chan struct{} { return s.done }

// Unmount unmounts the directory; Wait returns afterwards. It fails with EBUSY while a
// file is open or attached to a loop device: detach first. It may be called again
// after a failure; once the mount has ended, by Unmount or from outside, it does
// nothing.
func (s *Server) Unmount() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.done:
		return nil
	default:
	}
	err := s.srv.Unmount()
	if errors.Is(err, syscall.EINVAL) {
		// No longer a mount point: ended from outside, the serve loop is exiting.
		select {
		case <-s.done:
			return nil
		case <-time.After(5 * time.Second):
		}
	}
	if err != nil {
		return fmt.Errorf("fusefs: unmount %s: %w", s.dir, err)
	}
	return nil
}

// CheckName accepts what can be the name of a file in the FUSE directory: a single
// path element.
func CheckName(name string) error {
	switch {
	case name == "", name == ".", name == "..":
		return fmt.Errorf("fusefs: invalid file name %q", name)
	case len(name) > 255:
		return fmt.Errorf("fusefs: file name %.20q... is longer than 255 bytes", name)
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("fusefs: file name %q contains '/' or NUL", name)
	}
	return nil
}

// statfsBlockSize is the block size that statfs reports. A loop device over one of the
// files takes it as its discard granularity, so it is at least 4096 and at least every
// Device's preferred block size.
func statfsBlockSize(files []File) uint32 {
	bs := 4096
	for _, f := range files {
		bs = max(bs, blockdev.PreferredBlockSize(f.Device))
	}
	return uint32(bs)
}

// rootNode is the directory that holds the files.
type rootNode struct {
	fs.Inode
	files     []*fileNode
	start     time.Time
	blockSize uint32
}

var (
	_ fs.NodeOnAdder   = (*rootNode)(nil)
	_ fs.NodeGetattrer = (*rootNode)(nil)
	_ fs.NodeSetattrer = (*rootNode)(nil)
	_ fs.NodeStatfser  = (*rootNode)(nil)
)

// OnAdd creates the files when the file system is mounted.
func (r *rootNode) OnAdd(ctx context.Context) {
	for i, f := range r.files {
		ch := r.NewPersistentInode(ctx, f, fs.StableAttr{Mode: syscall.S_IFREG, Ino: uint64(i) + 2})
		if !r.AddChild(f.name, ch, false) {
			panic("BUG: fusefs: duplicate file name " + f.name)
		}
	}
}

// Getattr describes the directory: root only.
func (r *rootNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = 0o700
	out.Nlink = 2
	out.SetTimes(&r.start, &r.start, &r.start)
	return 0
}

// Setattr refuses every change to the directory.
func (r *rootNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return syscall.EPERM
}

// Statfs reports the total size of the files as used space.
func (r *rootNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	var total uint64
	for _, f := range r.files {
		total += uint64(f.size)
	}
	*out = fuse.StatfsOut{
		Bsize:   r.blockSize,
		Frsize:  r.blockSize,
		Blocks:  (total + uint64(r.blockSize) - 1) / uint64(r.blockSize),
		Files:   uint64(len(r.files)),
		NameLen: 255,
	}
	return 0
}
