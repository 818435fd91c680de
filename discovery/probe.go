package discovery

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/volmount"
)

// loopMajor is the block major number of loop devices (include/uapi/linux/major.h).
const loopMajor = 7

// probeResult is what one probe learned about one device.
type probeResult struct {
	// gone: the name no longer leads to a device (removed, replaced by something
	// that is not a drive, an unbound loop device, no medium): not a candidate.
	gone    bool
	key     Key
	kind    Kind
	size    int64
	backing string
	uuid    string
	label   string
	token   *luks2.AtrestToken
	warning error
	err     error
}

func (r *probeResult) candidate(k Key) Candidate {
	return Candidate{
		Key:           k,
		Kind:          r.kind,
		BackingFile:   r.backing,
		Size:          r.size,
		UUID:          r.uuid,
		Label:         r.label,
		Token:         r.token,
		HeaderWarning: r.warning,
		Err:           r.err,
	}
}

// inflight is a probe that runs in its own goroutine.
type inflight struct {
	started time.Time
	done    chan struct{} // closed when res is set
	res     probeResult
	// abandoned is set (under Scanner.mu) when the scan stopped waiting for it.
	abandoned bool
}

// probeBounded probes the group's most preferred name in a goroutine of its own and
// waits at most the probe timeout for it (see the package doc).
func (s *Scanner) probeBounded(ctx context.Context, g *group) probeResult {
	n := g.names[0]
	s.mu.Lock()
	if in := s.inflight[g.key]; in != nil {
		s.mu.Unlock()
		return notAnswering(n, in.started)
	}
	in := &inflight{started: time.Now(), done: make(chan struct{})}
	s.inflight[g.key] = in
	s.mu.Unlock()
	go func() {
		in.res = probe(n)
		s.mu.Lock()
		delete(s.inflight, g.key)
		late := in.abandoned
		s.mu.Unlock()
		close(in.done)
		if late {
			select {
			case s.late <- struct{}{}:
			default:
			}
		}
	}()
	timer := time.NewTimer(s.timeout)
	defer timer.Stop()
	cancelled := false
	select {
	case <-in.done:
		return in.res
	case <-timer.C:
	case <-ctx.Done():
		cancelled = true
	}
	s.mu.Lock()
	if s.inflight[g.key] != in {
		// It returned while we gave up.
		s.mu.Unlock()
		<-in.done
		return in.res
	}
	in.abandoned = true
	s.mu.Unlock()
	if !cancelled {
		s.log.Warn("discovery: device not answering", "path", n.path, "timeout", s.timeout)
	}
	return notAnswering(n, in.started)
}

// listed is what the listing knew of a name's device, before any probe.
func listed(n name) probeResult {
	r := probeResult{key: n.key, kind: KindBlock, size: n.size}
	if n.mode == unix.S_IFREG {
		r.kind = KindFile
	}
	return r
}

// notAnswering is the result for a name whose probe has not returned. Its message
// does not change while the same probe is stuck, so that a Watcher reports it once.
func notAnswering(n name, since time.Time) probeResult {
	r := listed(n)
	r.err = fmt.Errorf("%w: %s has not answered since %s", ErrNotAnswering, n.path, since.UTC().Format(time.RFC3339))
	return r
}

// probe opens one name read-only and reads what the device is and what its header
// says. It never opens anything but a block device or a regular file: the resolved
// path is opened with O_PATH|O_NOFOLLOW (which opens no device), checked with fstat,
// and only then reopened for reading through /proc/self/fd, which reaches the same
// inode whatever the path has become since.
func probe(n name) (r probeResult) {
	r = listed(n)
	pfd, err := openRetry(n.real, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC)
	if err != nil {
		return r.failOpen(n, err)
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return r.fail(fmt.Errorf("%w: stat %s: %w", ErrIO, n.path, err))
	}
	mode := st.Mode & unix.S_IFMT
	if mode != unix.S_IFBLK && mode != unix.S_IFREG {
		r.gone = true // replaced since the listing; never opened
		return r
	}
	direct := mode == unix.S_IFBLK
	flags := unix.O_RDONLY | unix.O_NONBLOCK | unix.O_NOCTTY | unix.O_CLOEXEC
	proc := "/proc/self/fd/" + strconv.Itoa(pfd)
	oflags := flags
	if direct {
		oflags |= unix.O_DIRECT
	}
	fd, err := openRetry(proc, oflags)
	if direct && errors.Is(err, unix.EINVAL) {
		direct = false
		fd, err = openRetry(proc, flags)
	}
	if err != nil {
		return r.failOpen(n, err)
	}
	defer unix.Close(fd)
	var st2 unix.Stat_t
	if err := unix.Fstat(fd, &st2); err != nil {
		return r.fail(fmt.Errorf("%w: stat %s: %w", ErrIO, n.path, err))
	}
	if st2.Mode&unix.S_IFMT != mode || st2.Dev != st.Dev || st2.Ino != st.Ino || st2.Rdev != st.Rdev {
		r.gone = true
		return r
	}
	// O_NONBLOCK was for the open only: reads must wait for the device.
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err == nil {
		unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_NONBLOCK)
	}

	switch mode {
	case unix.S_IFREG:
		r.key, r.kind, r.size = fileKey(unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino), KindFile, st.Size
	case unix.S_IFBLK:
		major, minor := unix.Major(st.Rdev), unix.Minor(st.Rdev)
		r.key, r.kind = blockKey(major, minor), KindBlock
		if major == loopMajor {
			r.backing = loopBacking(major, minor)
			if atrestView(r.backing) {
				r.gone = true // a volume's plaintext, never a drive
				return r
			}
			info, err := unix.IoctlLoopGetStatus64(fd)
			if errors.Is(err, unix.ENXIO) {
				r.gone = true // an unbound loop device
				return r
			}
			if err != nil {
				return r.fail(fmt.Errorf("%w: loop status of %s: %w", ErrIO, n.path, err))
			}
			// The kernel fills these from a stat of the backing file.
			if info.Rdevice != 0 {
				r.key = blockKey(unix.Major(info.Rdevice), unix.Minor(info.Rdevice))
			} else {
				r.key, r.kind = fileKey(unix.Major(info.Device), unix.Minor(info.Device), info.Inode), KindLoop
			}
		}
		size, err := unix.IoctlGetUint64(fd, unix.BLKGETSIZE64)
		if err != nil {
			return r.fail(fmt.Errorf("%w: size of %s (BLKGETSIZE64): %w", ErrIO, n.path, err))
		}
		if size == 0 {
			r.gone = true // no medium
			return r
		}
		r.size = int64(size)
	}
	r.readHeader(n.path, fd, direct)
	return r
}

// readHeader reads the LUKS2 header and the atrest token, never writing.
func (r *probeResult) readHeader(path string, fd int, direct bool) {
	if r.size < 4096 {
		r.err = fmt.Errorf("%w: %s holds %d bytes", ErrNotLUKS, path, r.size)
		return
	}
	rd := &fdReader{fd: fd, size: r.size, direct: direct}
	h, err := luks2.Load(rd)
	switch {
	case rd.err != nil:
		r.err = fmt.Errorf("%w: read %s: %w", ErrIO, path, rd.err)
		return
	case errors.Is(err, luks2.ErrNotLUKS):
		r.err = fmt.Errorf("%w: %s", ErrNotLUKS, path)
		return
	case errors.Is(err, luks2.ErrUnsupported):
		r.err = fmt.Errorf("%w: %s: %w", ErrUnsupported, path, err)
		return
	case err != nil:
		r.err = fmt.Errorf("%w: %s: %w", ErrDamaged, path, err)
		return
	}
	r.uuid, r.label = h.UUID(), h.Label()
	if bad, why := h.NeedsRepair(); bad {
		r.warning = why
	}
	tok, err := h.AtrestToken()
	switch {
	case err != nil:
		r.err = fmt.Errorf("%w: %s: %w", ErrBadToken, path, err)
	case tok == nil:
		r.err = fmt.Errorf("%w: %s", ErrNoToken, path)
	default:
		r.token = tok
	}
}

func (r probeResult) fail(err error) probeResult {
	r.err = err
	return r
}

// failOpen classifies a failed open: a name that leads nowhere now is gone, anything
// else is an I/O error of the device.
func (r probeResult) failOpen(n name, err error) probeResult {
	for _, e := range []error{unix.ENOENT, unix.ENOTDIR, unix.ELOOP, unix.ENXIO, unix.ENODEV, unix.ENOMEDIUM} {
		if errors.Is(err, e) {
			r.gone = true
			return r
		}
	}
	return r.fail(fmt.Errorf("%w: open %s: %w", ErrIO, n.path, err))
}

func openRetry(path string, flags int) (fd int, err error) {
	for {
		fd, err = unix.Open(path, flags, 0)
		if !errors.Is(err, unix.EINTR) {
			return fd, err
		}
	}
}

// loopBacking returns the backing file of a loop device as sysfs names it, "" if
// sysfs does not say.
func loopBacking(major, minor uint32) string {
	b, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/loop/backing_file", major, minor))
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(b), "\n")
}

// atrestView reports whether a loop device's backing file is a file of an atrest
// FUSE mount (type fuse.atrest): the plaintext of a volume that `atrest mount` serves,
// which is never a drive. Reading it would go through this node's own NBD export, and
// a probe stuck there (the volume's drive missing) could hold up the daemon's exit.
func atrestView(backing string) bool {
	if backing == "" {
		return false
	}
	ok, err := volmount.IsFUSEMount(filepath.Dir(strings.TrimSuffix(backing, " (deleted)")))
	return err == nil && ok
}

// dioAlign is the alignment of direct reads: at least every block device's logical
// block size.
const dioAlign = 4096

// fdReader reads a device through a raw descriptor (not an os.File: the runtime
// would register it with its poller, which for a FUSE file is a request to the FUSE
// server, possibly this very process). It remembers the first I/O error, so that a
// failed read is told from a damaged header.
type fdReader struct {
	fd     int
	size   int64
	direct bool
	err    error
}

func (r *fdReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d", off)
	}
	if off >= r.size {
		return 0, io.EOF
	}
	want := int(min(int64(len(p)), r.size-off))
	n, err := r.read(p[:want], off)
	if err != nil {
		if r.err == nil {
			r.err = err
		}
		return n, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (r *fdReader) read(p []byte, off int64) (int, error) {
	if !r.direct {
		return preadFull(r.fd, p, off)
	}
	start := off &^ (dioAlign - 1)
	end := (off + int64(len(p)) + dioAlign - 1) &^ (dioAlign - 1)
	buf := blockdev.AlignedBuffer(int(end - start))
	got, err := preadFull(r.fd, buf, start)
	if errors.Is(err, unix.EINVAL) {
		// The device refuses direct reads after all: read through the page cache.
		if fl, ferr := unix.FcntlInt(uintptr(r.fd), unix.F_GETFL, 0); ferr == nil {
			if _, ferr := unix.FcntlInt(uintptr(r.fd), unix.F_SETFL, fl&^unix.O_DIRECT); ferr == nil {
				r.direct = false
				return preadFull(r.fd, p, off)
			}
		}
	}
	n := max(0, min(got-int(off-start), len(p)))
	if n > 0 {
		copy(p, buf[off-start:off-start+int64(n)])
	}
	return n, err
}

// preadFull reads until p is full, the end is reached or an error occurs.
func preadFull(fd int, p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := unix.Pread(fd, p[done:], off+int64(done))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("pread at %d: %w", off+int64(done), err)
		}
		if n == 0 {
			break
		}
		done += n
	}
	return done, nil
}
