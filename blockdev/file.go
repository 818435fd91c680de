package blockdev

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// FileOptions choose how OpenFile opens a drive.
type FileOptions struct {
	// ReadOnly opens the drive for reading only; every change fails with ErrReadOnly.
	ReadOnly bool
	// Direct opens the drive with O_DIRECT, bypassing the page cache. Requests whose
	// offset, length and buffer address meet the file system's direct I/O alignment
	// (statx STATX_DIOALIGN; AlignedBuffer gives suitable buffers) go straight to the
	// kernel. Others still work: an aligned request from an unaligned buffer is copied
	// through an aligned bounce buffer, and an unaligned write becomes a read-modify-write
	// of the aligned blocks it touches, serialized against every other change to the
	// drive through this File. The size of a regular file opened with Direct must be a
	// multiple of the alignment, so that no write ever reaches past its end.
	Direct bool
	// Exclusive holds the drive for as long as the File is open, against every other
	// exclusive opener: a block device is opened with O_EXCL, which the kernel refuses
	// while another O_EXCL opener holds the device or it is mounted or part of a
	// device-mapper or md device; a regular file (an image) takes flock(LOCK_EX|LOCK_NB).
	// When another opener holds it, OpenFile fails with an error wrapping ErrInUse that
	// names the holder where it can be found.
	//
	// The lock keeps apart atrest's own processes (the daemon holds its drives; format
	// and adopt need them exclusively) and the programs that open exclusively too
	// (mount, mkfs, cryptsetup on a block device). It is advisory: an opener that does not
	// ask for it, such as dd, a plain open or a reader beside the daemon, still reads and
	// writes.
	Exclusive bool
}

// File is a Device over a regular file or a block device, read and written with
// pread/pwrite. Its size is fixed when it is opened: it never grows the file, and a write
// past the end writes nothing and fails with ErrOutOfRange.
//
// Trim punches a hole in a regular file (fallocate PUNCH_HOLE) and discards on a block
// device (BLKDISCARD, only the part aligned to the logical block size; the unaligned
// edges keep their contents, which Trim allows). WriteZeroes uses fallocate ZERO_RANGE,
// or PUNCH_HOLE under ZeroMayUnmap, on a regular file and BLKZEROOUT on a block device,
// and writes buffers of zeroes where the kernel answers EOPNOTSUPP. WriteAtFUA uses
// pwritev2 with RWF_DSYNC. Flush is fdatasync.
//
// Caps answer from what the kernel says: a block device trims while its queue's
// discard_max_bytes is not 0 (a loop device turns it to 0 when its file refuses a
// discard) and zeroes fast when it offloads WRITE_ZEROES; a regular file trims and
// zeroes fast until the file system answers EOPNOTSUPP, after which the File reports
// the capability gone.
//
// Errors carry the class of their errno (see Classify): a pulled drive's ENODEV is
// ErrGone, an EIO ErrMedium, and the errno stays wrapped.
//
// A File is safe for concurrent use. Close waits for the calls in progress, and every
// call after it fails with ErrClosed: the descriptor is never used after it is closed.
type File struct {
	path      string
	ro        bool
	direct    bool
	blockDev  bool
	size      int64
	blockSize int    // PreferredBlockSize
	logical   int64  // block devices: logical block size, the unit of BLKDISCARD/BLKZEROOUT
	dioAlign  int64  // Direct: alignment of offsets and lengths
	memAlign  int    // Direct: alignment of buffer addresses
	zeroFast  bool   // block devices: the device offloads WRITE_ZEROES
	rdev      uint64 // block devices: the device number, for its queue limits in sysfs
	sys       sysCalls

	// mu is held shared by every call that uses fd and exclusively by Close.
	mu     sync.RWMutex
	fd     int
	closed bool

	// rmw, with Direct only, is held exclusively by a read-modify-write and shared by
	// every other change, so that a read-modify-write never writes back stale bytes of a
	// block that another call changes at the same time.
	rmw sync.RWMutex

	// noRWFDSync is set once pwritev2 turns out not to support RWF_DSYNC; WriteAtFUA then
	// writes and calls fdatasync.
	noRWFDSync atomic.Bool
	// noTrim and noZero are set once the kernel refuses to punch holes or discard (noTrim)
	// or to zero a range itself (noZero) with EOPNOTSUPP; Caps stop offering them.
	noTrim, noZero atomic.Bool
}

var (
	_ Device       = (*File)(nil)
	_ Trimmer      = (*File)(nil)
	_ ZeroWriter   = (*File)(nil)
	_ FUAWriter    = (*File)(nil)
	_ BlockSizer   = (*File)(nil)
	_ CapsReporter = (*File)(nil)
)

// bounceSize is the size of the aligned buffers that unaligned Direct I/O goes through.
const bounceSize = 1 << 20

var bouncePool = sync.Pool{New: func() any { b := AlignedBuffer(bounceSize); return &b }}

// OpenFile opens the regular file or block device at path as a Device.
func OpenFile(path string, opts FileOptions) (*File, error) {
	flags := unix.O_RDWR | unix.O_CLOEXEC
	if opts.ReadOnly {
		flags = unix.O_RDONLY | unix.O_CLOEXEC
	}
	if opts.Direct {
		flags |= unix.O_DIRECT
	}
	if opts.Exclusive {
		// Without O_CREAT, Linux honours O_EXCL on block devices and ignores it on
		// other files; regular files take a flock below.
		flags |= unix.O_EXCL
	}
	var fd int
	err := retryEINTR(func() (err error) {
		fd, err = unix.Open(path, flags, 0)
		return err
	})
	if err != nil {
		switch {
		case opts.Direct && errors.Is(err, unix.EINVAL):
			return nil, fmt.Errorf("open %s with O_DIRECT: %w (the file system does not support direct I/O)", path, err)
		case opts.Exclusive && errors.Is(err, unix.EBUSY):
			return nil, inUse(path, blockDeviceHolder(path))
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	f := &File{path: path, ro: opts.ReadOnly, direct: opts.Direct, fd: fd, sys: realSys}
	if err := f.probe(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if opts.Exclusive && !f.blockDev {
		if err := f.lockFile(); err != nil {
			unix.Close(fd)
			return nil, err
		}
	}
	return f, nil
}

// lockFile takes the exclusive flock of a regular file opened with Exclusive. It goes
// with the descriptor: Close releases it.
func (f *File) lockFile() error {
	err := retryEINTR(func() error { return unix.Flock(f.fd, unix.LOCK_EX|unix.LOCK_NB) })
	switch {
	case errors.Is(err, unix.EWOULDBLOCK):
		return inUse(f.path, flockHolder(f.fd))
	case err != nil:
		return fmt.Errorf("flock %s: %w", f.path, err)
	}
	return nil
}

// inUse is the error of an exclusive open that another opener holds.
func inUse(path, holder string) error {
	if holder == "" {
		return fmt.Errorf("open %s exclusively: %w", path, ErrInUse)
	}
	return fmt.Errorf("open %s exclusively: %w (%s)", path, ErrInUse, holder)
}

// probe fills in the size and the block sizes of the open drive.
func (f *File) probe() error {
	var st unix.Stat_t
	if err := unix.Fstat(f.fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", f.path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		f.size = st.Size
		f.blockSize = int(st.Blksize)
	case unix.S_IFBLK:
		f.blockDev = true
		size, err := unix.IoctlGetUint64(f.fd, unix.BLKGETSIZE64)
		if err != nil {
			return fmt.Errorf("size of block device %s (BLKGETSIZE64): %w", f.path, err)
		}
		f.size = int64(size)
		logical, err := unix.IoctlGetInt(f.fd, unix.BLKSSZGET)
		if err != nil {
			return fmt.Errorf("logical block size of %s (BLKSSZGET): %w", f.path, err)
		}
		physical, err := unix.IoctlGetInt(f.fd, unix.BLKPBSZGET)
		if err != nil {
			return fmt.Errorf("physical block size of %s (BLKPBSZGET): %w", f.path, err)
		}
		if !isPowerOfTwo(int64(logical)) || !isPowerOfTwo(int64(physical)) {
			return fmt.Errorf("block device %s reports block sizes %d (logical) and %d (physical), not powers of two", f.path, logical, physical)
		}
		f.logical = int64(logical)
		f.blockSize = max(logical, physical)
		f.rdev = st.Rdev
		f.zeroFast = queueLimit(st.Rdev, "write_zeroes_max_bytes") > 0
	default:
		return fmt.Errorf("%s is neither a regular file nor a block device", f.path)
	}
	if f.blockSize <= 0 || !isPowerOfTwo(int64(f.blockSize)) {
		f.blockSize = 4096
	}
	if f.direct {
		if err := f.probeDirect(); err != nil {
			return err
		}
		f.blockSize = max(f.blockSize, int(f.dioAlign))
	}
	return nil
}

// probeDirect finds the alignment that O_DIRECT asks for.
func (f *File) probeDirect() error {
	var stx unix.Statx_t
	err := unix.Statx(f.fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx)
	switch {
	case err == nil && stx.Mask&unix.STATX_DIOALIGN != 0:
		if stx.Dio_offset_align == 0 {
			return fmt.Errorf("open %s with O_DIRECT: the file system does not support direct I/O on it", f.path)
		}
		f.dioAlign, f.memAlign = int64(stx.Dio_offset_align), int(stx.Dio_mem_align)
	case f.blockDev:
		f.dioAlign, f.memAlign = f.logical, int(f.logical)
	default:
		// The kernel does not say: assume the most any Linux file system asks for.
		f.dioAlign, f.memAlign = BufferAlign, BufferAlign
	}
	if !isPowerOfTwo(f.dioAlign) || f.dioAlign > bounceSize || !isPowerOfTwo(int64(f.memAlign)) || f.memAlign > BufferAlign {
		return fmt.Errorf("open %s with O_DIRECT: unusable alignment (offsets %d, memory %d)", f.path, f.dioAlign, f.memAlign)
	}
	if f.size%f.dioAlign != 0 {
		return fmt.Errorf("open %s with O_DIRECT: its size %d is not a multiple of the direct I/O alignment %d", f.path, f.size, f.dioAlign)
	}
	return nil
}

// Size returns the size of the drive when it was opened.
func (f *File) Size() int64 { return f.size }

// PreferredBlockSize returns the physical block size of a block device, or st_blksize of
// a regular file, raised to the direct I/O alignment with Direct.
func (f *File) PreferredBlockSize() int { return f.blockSize }

// Caps reports what the drive can do now (see File).
func (f *File) Caps() Caps {
	if f.ro {
		return Caps{ReadOnly: true, BlockSize: f.blockSize}
	}
	c := Caps{Zeroes: true, FUA: true, BlockSize: f.blockSize}
	if f.blockDev {
		c.Trim = !f.noTrim.Load() && queueLimit(f.rdev, "discard_max_bytes") > 0
		c.FastZero = f.zeroFast && !f.noZero.Load()
	} else {
		// PUNCH_HOLE serves both Trim and a zeroing that may unmap.
		c.Trim = !f.noTrim.Load()
		c.FastZero = c.Trim || !f.noZero.Load()
	}
	return c
}

// ReadAt reads len(p) bytes at off; see Device for the behaviour at the end.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.closed {
		return 0, f.closedErr("read")
	}
	if off < 0 {
		return 0, fmt.Errorf("read %s: %w", f.path, CheckRange(off, int64(len(p)), f.size))
	}
	if off >= f.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > f.size-off {
		p, eof = p[:f.size-off], io.EOF
	}
	var n int
	var err error
	if f.direct && !f.directAligned(p, off) {
		n, err = f.readBounced(p, off)
	} else {
		n, err = f.preadFull(p, off)
	}
	if err != nil {
		return n, err
	}
	return n, eof
}

// WriteAt writes p at off. A write that does not fit writes nothing.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	return f.writeAt(p, off, false)
}

// WriteAtFUA writes p at off and returns when it is on stable storage (pwritev2 with
// RWF_DSYNC, or pwrite and fdatasync where the kernel lacks it).
func (f *File) WriteAtFUA(p []byte, off int64) (int, error) {
	return f.writeAt(p, off, true)
}

func (f *File) writeAt(p []byte, off int64, fua bool) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if err := f.checkChange("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if !f.direct {
		return f.pwriteFull(p, off, fua)
	}
	return f.writeDirect(p, off, fua)
}

// checkChange refuses a change of [off, off+n) on a closed or read-only drive or out of
// range. The caller holds mu.
func (f *File) checkChange(op string, off, n int64) error {
	if f.closed {
		return f.closedErr(op)
	}
	if f.ro {
		return fmt.Errorf("%s %s: %w", op, f.path, ErrReadOnly)
	}
	if err := CheckRange(off, n, f.size); err != nil {
		return fmt.Errorf("%s %s: %w", op, f.path, err)
	}
	return nil
}

func (f *File) closedErr(op string) error {
	return fmt.Errorf("%s %s: %w", op, f.path, ErrClosed)
}

// directAligned reports whether O_DIRECT accepts p at off as it is.
func (f *File) directAligned(p []byte, off int64) bool {
	return off%f.dioAlign == 0 && int64(len(p))%f.dioAlign == 0 && isAligned(p, f.memAlign)
}

// preadFull reads all of p at off, which the caller has checked lies before the end,
// going on after short reads and EINTR.
func (f *File) preadFull(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := f.sys.pread(f.fd, p[done:], off+int64(done))
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return done, fmt.Errorf("read %s at offset %d: %w", f.path, off+int64(done), Classify(err))
		case n <= 0:
			return done, fmt.Errorf("read %s at offset %d: %w (the drive is shorter than when it was opened)",
				f.path, off+int64(done), io.ErrUnexpectedEOF)
		}
		done += n
	}
	return done, nil
}

// pwriteFull writes all of p at off, going on after short writes and EINTR; with fua the
// bytes are on stable storage when it returns.
func (f *File) pwriteFull(p []byte, off int64, fua bool) (int, error) {
	done := 0
	for done < len(p) {
		var n int
		var err error
		if fua && !f.noRWFDSync.Load() {
			n, err = f.sys.pwritev2(f.fd, [][]byte{p[done:]}, off+int64(done), unix.RWF_DSYNC)
			if isNotSupported(err) {
				f.noRWFDSync.Store(true)
				continue
			}
		} else {
			n, err = f.sys.pwrite(f.fd, p[done:], off+int64(done))
		}
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return done, fmt.Errorf("write %s at offset %d: %w", f.path, off+int64(done), Classify(err))
		case n <= 0:
			return done, fmt.Errorf("write %s at offset %d: %w", f.path, off+int64(done), io.ErrShortWrite)
		}
		done += n
	}
	if fua && f.noRWFDSync.Load() {
		if err := f.fdatasync(); err != nil {
			return done, err
		}
	}
	return done, nil
}

// readBounced reads p at off through an aligned buffer (Direct only). [off, off+len(p))
// lies within the drive, whose size is a multiple of dioAlign.
func (f *File) readBounced(p []byte, off int64) (int, error) {
	bp := bouncePool.Get().(*[]byte)
	defer bouncePool.Put(bp)
	buf := *bp
	end := off + int64(len(p))
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		start := alignDown(pos, f.dioAlign)
		stop := min(alignUp(end, f.dioAlign), start+bounceSize)
		if _, err := f.preadFull(buf[:stop-start], start); err != nil {
			return done, err
		}
		done += copy(p[done:], buf[pos-start:stop-start])
	}
	return done, nil
}

// writeDirect writes p at off on a drive opened with O_DIRECT.
func (f *File) writeDirect(p []byte, off int64, fua bool) (int, error) {
	end := off + int64(len(p))
	if off%f.dioAlign == 0 && end%f.dioAlign == 0 {
		f.rmw.RLock()
		defer f.rmw.RUnlock()
		if isAligned(p, f.memAlign) {
			return f.pwriteFull(p, off, fua)
		}
		bp := bouncePool.Get().(*[]byte)
		defer bouncePool.Put(bp)
		done := 0
		for done < len(p) {
			c := copy(*bp, p[done:])
			if _, err := f.pwriteFull((*bp)[:c], off+int64(done), fua); err != nil {
				return done, err
			}
			done += c
		}
		return done, nil
	}

	// Read-modify-write of the partial blocks at either end, alone on the drive.
	f.rmw.Lock()
	defer f.rmw.Unlock()
	bp := bouncePool.Get().(*[]byte)
	defer bouncePool.Put(bp)
	buf := *bp
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		start := alignDown(pos, f.dioAlign)
		stop := min(alignUp(end, f.dioAlign), start+bounceSize)
		chunk := buf[:stop-start]
		headRead := false
		if pos > start {
			if _, err := f.preadFull(chunk[:f.dioAlign], start); err != nil {
				return done, err
			}
			headRead = true
		}
		if last := stop - f.dioAlign; end < stop && !(headRead && last == start) {
			if _, err := f.preadFull(chunk[last-start:], last); err != nil {
				return done, err
			}
		}
		c := copy(chunk[pos-start:], p[done:])
		if _, err := f.pwriteFull(chunk, start, fua); err != nil {
			return done, err
		}
		done += c
	}
	return done, nil
}

// Flush calls fdatasync.
func (f *File) Flush() error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.closed {
		return f.closedErr("flush")
	}
	return f.fdatasync()
}

func (f *File) fdatasync() error {
	if err := retryEINTR(func() error { return f.sys.fdatasync(f.fd) }); err != nil {
		return fmt.Errorf("fdatasync %s: %w", f.path, Classify(err))
	}
	return nil
}

// Trim punches a hole in a regular file or discards the blocks of a block device. It
// fails with ErrNotSupported where the kernel cannot.
func (f *File) Trim(off, n int64) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if err := f.checkChange("trim", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if f.direct {
		f.rmw.RLock()
		defer f.rmw.RUnlock()
	}
	var err error
	if f.blockDev {
		a, b := alignedInner(off, n, f.logical)
		if a == b {
			return nil
		}
		err = retryEINTR(func() error { return f.sys.ioctlRange(f.fd, unix.BLKDISCARD, a, b-a) })
	} else {
		err = f.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
	switch {
	case isNotSupported(err):
		f.noTrim.Store(true)
		return fmt.Errorf("trim %s at offset %d length %d: %w: %w", f.path, off, n, ErrNotSupported, err)
	case err != nil:
		return fmt.Errorf("trim %s at offset %d length %d: %w", f.path, off, n, Classify(err))
	}
	return nil
}

func (f *File) fallocate(mode uint32, off, n int64) error {
	return retryEINTR(func() error { return f.sys.fallocate(f.fd, mode, off, n) })
}

// WriteZeroes zeroes [off, off+n). On a regular file it uses fallocate ZERO_RANGE, or
// PUNCH_HOLE first under ZeroMayUnmap; on a block device BLKZEROOUT for the part aligned
// to the logical block size. Where the kernel answers EOPNOTSUPP it writes buffers of
// zeroes, or, under ZeroFast, fails with ErrNotFast and changes nothing. On a block
// device ZeroFast is honoured only when the device offloads WRITE_ZEROES (sysfs
// write_zeroes_max_bytes), since BLKZEROOUT otherwise writes zeroes itself.
func (f *File) WriteZeroes(off, n int64, flags ZeroFlags) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if err := f.checkChange("write zeroes", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	var err error
	if f.blockDev {
		err = f.zeroBlockDev(off, n, flags)
	} else {
		err = f.zeroRegular(off, n, flags)
	}
	if err != nil {
		return fmt.Errorf("write zeroes %s at offset %d length %d: %w", f.path, off, n, Classify(err))
	}
	return nil
}

func (f *File) zeroRegular(off, n int64, flags ZeroFlags) error {
	err := func() error {
		if f.direct {
			f.rmw.RLock()
			defer f.rmw.RUnlock()
		}
		var err error = unix.EOPNOTSUPP
		if flags&ZeroMayUnmap != 0 {
			err = f.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
			if isNotSupported(err) {
				f.noTrim.Store(true)
			}
		}
		if isNotSupported(err) {
			err = f.fallocate(unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
			if isNotSupported(err) {
				f.noZero.Store(true)
			}
		}
		return err
	}()
	if !isNotSupported(err) {
		return err
	}
	if flags&ZeroFast != 0 {
		return fmt.Errorf("%w: %w", ErrNotFast, err)
	}
	return f.writeZeroBuffers(off, n)
}

func (f *File) zeroBlockDev(off, n int64, flags ZeroFlags) error {
	if flags&ZeroFast != 0 && !f.zeroFast {
		return fmt.Errorf("%w: the device does not offload WRITE_ZEROES", ErrNotFast)
	}
	a, b := alignedInner(off, n, f.logical)
	if a < b {
		err := func() error {
			if f.direct {
				f.rmw.RLock()
				defer f.rmw.RUnlock()
			}
			return retryEINTR(func() error { return f.sys.ioctlRange(f.fd, unix.BLKZEROOUT, a, b-a) })
		}()
		if isNotSupported(err) {
			f.noZero.Store(true)
		}
		switch {
		case isNotSupported(err) && flags&ZeroFast != 0:
			return fmt.Errorf("%w: %w", ErrNotFast, err)
		case isNotSupported(err):
			return f.writeZeroBuffers(off, n)
		case err != nil:
			return err
		}
	} else {
		// No aligned block inside: the whole range is an edge.
		a, b = off+n, off+n
	}
	if err := f.writeZeroBuffers(off, a-off); err != nil {
		return err
	}
	return f.writeZeroBuffers(b, off+n-b)
}

// writeZeroBuffers writes zeroes over [off, off+n). The caller holds mu (shared) and
// not rmw.
func (f *File) writeZeroBuffers(off, n int64) error {
	return WriteZeroBuffers(WriterAtFunc(func(p []byte, off int64) (int, error) {
		if f.direct {
			return f.writeDirect(p, off, false)
		}
		return f.pwriteFull(p, off, false)
	}), off, n)
}

// Close closes the descriptor after the calls in progress return. A second Close fails
// with ErrClosed.
func (f *File) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return f.closedErr("close")
	}
	f.closed = true
	// Never retried: Linux releases the descriptor even when close reports an error.
	if err := unix.Close(f.fd); err != nil {
		return fmt.Errorf("close %s: %w", f.path, err)
	}
	return nil
}
