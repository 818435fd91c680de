package volmount

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// loopMajor is the block major number of loop devices (include/uapi/linux/major.h).
const loopMajor = 7

// AttachOptions tune a loop device.
type AttachOptions struct {
	// ReadOnly attaches the file read-only.
	ReadOnly bool
	// BlockSize is the logical block size of the loop device: 512, 1024, 2048 or 4096;
	// 0 means 4096, the sector size of atrest's encrypted drives (smaller requests
	// would cost them a read-modify-write cycle). File systems with smaller blocks or
	// sectors (ext4 -b 1024, xfs -s 512) need 512.
	BlockSize int
}

// Loop is a loop device attached by this process, with auto-clear: the kernel detaches
// it when its last user closes it. The Loop holds it open until Release, so that the
// device survives until a file system is mounted on it.
type Loop struct {
	number int
	path   string
	file   string
	fd     int // -1 after Release
}

// Attach attaches file (a regular file, such as a FUSE file of fusefs, or a block
// device) to a free loop device with direct I/O and auto-clear, through the loop ioctls
// (LOOP_CTL_GET_FREE, LOOP_CONFIGURE). Direct I/O is required, not merely asked for: a
// loop device that would go through the page cache of the file fails the call, since
// over a FUSE file that cache would hold plaintext and, under memory pressure, could
// deadlock writeback against the FUSE server.
func Attach(file string, opts AttachOptions) (*Loop, error) {
	bs := opts.BlockSize
	if bs == 0 {
		bs = 4096
	}
	switch bs {
	case 512, 1024, 2048, 4096:
	default:
		return nil, fmt.Errorf("attach %s: block size %d is not 512, 1024, 2048 or 4096", file, opts.BlockSize)
	}
	file, err := filepath.Abs(file)
	if err != nil {
		return nil, fmt.Errorf("attach: %w", err)
	}
	mode := unix.O_RDWR
	if opts.ReadOnly {
		mode = unix.O_RDONLY
	}
	// A raw open, not os.Open: the Go runtime would try to add the descriptor to its
	// poller, which for a FUSE file is a POLL request to a server that may be this
	// process.
	backing, err := unix.Open(file, mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", file, err)
	}
	defer unix.Close(backing)
	var st unix.Stat_t
	if err := unix.Fstat(backing, &st); err != nil {
		return nil, fmt.Errorf("attach %s: %w", file, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG && st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return nil, fmt.Errorf("attach %s: not a regular file or a block device", file)
	}

	cfg := unix.LoopConfig{Fd: uint32(backing), Size: uint32(bs)}
	cfg.Info.Flags = unix.LO_FLAGS_DIRECT_IO | unix.LO_FLAGS_AUTOCLEAR
	if opts.ReadOnly {
		cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	copy(cfg.Info.File_name[:unix.LO_NAME_SIZE-1], file)

	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("attach %s: open /dev/loop-control (is the loop module loaded?): %w", file, err)
	}
	defer unix.Close(ctl)
	// Another process may take the free device between GET_FREE and CONFIGURE.
	for try := 0; ; try++ {
		n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("attach %s: find a free loop device: %w", file, err)
		}
		l, err := configure(n, &cfg, file)
		if errors.Is(err, unix.EBUSY) && try < 20 {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("attach %s: %w", file, err)
		}
		if err := l.check(); err != nil {
			l.Release()
			return nil, fmt.Errorf("attach %s: %w", file, err)
		}
		return l, nil
	}
}

// configure binds loop device n to the backing file described by cfg.
func configure(n int, cfg *unix.LoopConfig, file string) (*Loop, error) {
	path := "/dev/loop" + strconv.Itoa(n)
	// Without udev (containers), a loop device created by GET_FREE has no node yet.
	err := unix.Mknod(path, unix.S_IFBLK|0o660, int(unix.Mkdev(loopMajor, uint32(n))))
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if err := unix.IoctlLoopConfigure(fd, cfg); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("configure %s: %w", path, err)
	}
	return &Loop{number: n, path: path, file: file, fd: fd}, nil
}

// check verifies that the kernel kept direct I/O on.
//
// Discards are not switched here: writing 0 to queue/discard_max_bytes would stick to
// the loop device after it is detached (Linux 6.18 then refuses any other value until
// the device is removed), spoiling it for its next user. Whether discards reach the
// drive is decided under the loop device, by the FUSE file (from its Device's Caps).
func (l *Loop) check() error {
	dio, err := l.sysfs("loop/dio")
	if err != nil {
		return err
	}
	if dio != "1" {
		return fmt.Errorf("%s: the file refuses direct I/O (a loop device through its page cache is not safe over FUSE)", l.path)
	}
	return nil
}

// Path returns the device node, such as /dev/loop3.
func (l *Loop) Path() string { return l.path }

// File returns the absolute path of the backing file.
func (l *Loop) File() string { return l.file }

// Release closes this process's descriptor of the device. If nothing else holds it
// (no mount, no other opener), the kernel detaches it now; otherwise when the last
// user lets go. Release is idempotent.
func (l *Loop) Release() error {
	if l.fd < 0 {
		return nil
	}
	err := unix.Close(l.fd)
	l.fd = -1
	if err != nil {
		return fmt.Errorf("close %s: %w", l.path, err)
	}
	return nil
}

func (l *Loop) sysfs(name string) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/%s", l.number, name))
	if err != nil {
		return "", fmt.Errorf("%s: %w", l.path, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// loopDevice is a bound loop device as sysfs shows it.
type loopDevice struct {
	number       int
	major, minor uint32
	backing      string
}

func (d loopDevice) path() string { return "/dev/loop" + strconv.Itoa(d.number) }

// boundLoops lists the loop devices that have a backing file.
func boundLoops() ([]loopDevice, error) {
	dirs, err := filepath.Glob("/sys/block/loop[0-9]*")
	if err != nil {
		return nil, err
	}
	var out []loopDevice
	for _, dir := range dirs {
		n, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(dir), "loop"))
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, "loop/backing_file"))
		if err != nil {
			continue // not bound (the loop directory only exists while bound)
		}
		dev, err := os.ReadFile(filepath.Join(dir, "dev"))
		if err != nil {
			continue
		}
		majStr, minStr, _ := strings.Cut(strings.TrimSpace(string(dev)), ":")
		maj, _ := strconv.ParseUint(majStr, 10, 32)
		mnr, _ := strconv.ParseUint(minStr, 10, 32)
		out = append(out, loopDevice{
			number:  n,
			major:   uint32(maj),
			minor:   uint32(mnr),
			backing: strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), " (deleted)"),
		})
	}
	return out, nil
}

// LoopsOf returns the loop devices whose backing file is file.
func LoopsOf(file string) ([]string, error) {
	file, err := filepath.Abs(file)
	if err != nil {
		return nil, err
	}
	loops, err := boundLoops()
	if err != nil {
		return nil, fmt.Errorf("list loop devices: %w", err)
	}
	var out []string
	for _, l := range loops {
		if l.backing == file {
			out = append(out, l.path())
		}
	}
	return out, nil
}

// Detach detaches the loop device dev (LOOP_CLR_FD) and waits until the kernel has let
// go of its backing file. A device still in use (mounted) is detached when its last
// user closes it; Detach then fails with EBUSY after waiting a few seconds. Detaching
// a device that is not attached does nothing.
func Detach(dev string) error {
	n, err := loopNumber(dev)
	if err != nil {
		return err
	}
	if err := DetachLazily(dev); err != nil {
		return err
	}
	return waitUnbound(dev, n)
}

// DetachLazily detaches the loop device dev (LOOP_CLR_FD) without waiting: a device
// that no one holds goes at once (the kernel may finish in a work queue), one still in
// use (a file system lazily unmounted, with files open there) when its last user lets
// go. Detaching a device that is not attached does nothing.
func DetachLazily(dev string) error {
	if _, err := loopNumber(dev); err != nil {
		return err
	}
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENXIO) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("detach %s: %w", dev, err)
	}
	err = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
	unix.Close(fd) // our descriptor is the last one if nothing else uses the device
	if err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("detach %s: %w", dev, err)
	}
	return nil
}

// waitUnbound polls sysfs until loop device n has no backing file: the kernel clears
// it when the last opener closes, possibly in a work queue after close returned.
func waitUnbound(dev string, n int) error {
	p := fmt.Sprintf("/sys/block/loop%d/loop/backing_file", n)
	deadline := time.Now().Add(unbindTimeout)
	for delay := time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("detach %s: still attached after %v, something holds it open: %w", dev, unbindTimeout, unix.EBUSY)
		}
		time.Sleep(delay)
	}
}

// unbindTimeout bounds the wait for the kernel to detach a loop device.
var unbindTimeout = 5 * time.Second

// loopNumber parses /dev/loopN.
func loopNumber(dev string) (int, error) {
	s, ok := strings.CutPrefix(dev, "/dev/loop")
	n, err := strconv.Atoi(s)
	if !ok || err != nil || n < 0 {
		return 0, fmt.Errorf("%q is not a loop device path (/dev/loopN)", dev)
	}
	return n, nil
}
