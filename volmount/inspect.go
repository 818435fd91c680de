package volmount

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Stack is what Inspect finds at a mount point: the file system mounted there, the
// loop device it is mounted from and the loop device's backing file, and the fusefs
// mount (type fuse.atrest) that holds that file. Fields are "" for what is absent.
type Stack struct {
	Mountpoint string
	Source     string // the mount's source, such as /dev/loop3
	FSType     string // "" when nothing is mounted on Mountpoint
	Loop       string // the loop device of the mount, if it is one
	File       string // the loop device's backing file
	FUSEDir    string // the fuse.atrest mount that holds File, if any
}

// Mounted reports whether a file system is mounted on the mount point.
func (s Stack) Mounted() bool { return s.FSType != "" }

// Atrest reports whether the mount is a stack of atrest's: a loop device over a file
// in a fusefs mount.
func (s Stack) Atrest() bool { return s.Loop != "" && s.FUSEDir != "" }

// Inspect describes what is mounted on mountpoint (an absolute or relative path; not
// resolved through symbolic links). Nothing mounted is not an error.
func Inspect(mountpoint string) (Stack, error) {
	mp, err := filepath.Abs(mountpoint)
	if err != nil {
		return Stack{}, fmt.Errorf("inspect %s: %w", mountpoint, err)
	}
	s := Stack{Mountpoint: mp}
	mounts, err := readMounts()
	if err != nil {
		return s, fmt.Errorf("inspect %s: %w", mp, err)
	}
	m, ok := mountAt(mounts, mp)
	if !ok {
		return s, nil
	}
	s.Source, s.FSType = m.source, m.fsType
	if m.major != loopMajor {
		return s, nil
	}
	loops, err := boundLoops()
	if err != nil {
		return s, fmt.Errorf("inspect %s: list loop devices: %w", mp, err)
	}
	for _, l := range loops {
		if l.major == m.major && l.minor == m.minor {
			s.Loop, s.File = l.path(), l.backing
		}
	}
	if s.File != "" {
		if f, ok := mountAt(mounts, filepath.Dir(s.File)); ok && f.fsType == fuseType {
			s.FUSEDir = filepath.Dir(s.File)
		}
	}
	return s, nil
}

// IsFUSEMount reports whether dir is a fusefs mount (type fuse.atrest), alive or dead.
func IsFUSEMount(dir string) (bool, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return false, err
	}
	mounts, err := readMounts()
	if err != nil {
		return false, err
	}
	m, ok := mountAt(mounts, dir)
	return ok && m.fsType == fuseType, nil
}

// UnmountFUSE ends the fusefs mount on dir, as Teardown does: a dead one (its server
// gone) is unmounted, a busy one detached lazily. A dir that is not a fusefs mount is
// left alone.
func UnmountFUSE(dir string) error {
	ok, err := IsFUSEMount(dir)
	if err != nil || !ok {
		return err
	}
	return unmountFUSE(dir)
}

// fuseControlDir is where the fusectl file system shows one directory per FUSE
// connection (Documentation/filesystems/fuse.rst, "Control filesystem").
const fuseControlDir = "/sys/fs/fuse/connections"

// AbortFUSE aborts the FUSE connection of the fusefs mount on dir, by writing to its
// abort file in the fusectl file system (mounted on /sys/fs/fuse/connections first if
// nothing is mounted there, as systemd does at boot): every request pending on the
// connection fails at once, and every later one fails with ENOTCONN, whether its
// server answers or not, so that what is stacked on the file (a loop device, a file
// system) gets I/O errors instead of waiting. The server's reads of /dev/fuse fail
// from then on; the mount stays until unmounted (UnmountFUSE). A dir that is not a
// fusefs mount is left alone.
func AbortFUSE(dir string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	mounts, err := readMounts()
	if err != nil {
		return fmt.Errorf("abort the FUSE connection of %s: %w", dir, err)
	}
	m, ok := mountAt(mounts, dir)
	if !ok || m.fsType != fuseType {
		return nil
	}
	if c, ok := mountAt(mounts, fuseControlDir); !ok || c.fsType != "fusectl" {
		if err := unix.Mount("fusectl", fuseControlDir, "fusectl", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			return fmt.Errorf("abort the FUSE connection of %s: mount fusectl on %s: %w", dir, fuseControlDir, err)
		}
	}
	// A connection is named after its device number as the kernel encodes it
	// (MKDEV: major << 20 | minor); mountinfo shows major:minor.
	conn := strconv.FormatUint(uint64(m.major)<<20|uint64(m.minor), 10)
	if err := os.WriteFile(filepath.Join(fuseControlDir, conn, "abort"), []byte("1\n"), 0); err != nil {
		return fmt.Errorf("abort the FUSE connection of %s: %w", dir, err)
	}
	return nil
}

// QueueLimit reads a number from the request queue of the block device dev (a
// /dev/NAME path), such as "write_zeroes_max_bytes" or "discard_max_bytes".
func QueueLimit(dev, name string) (int64, error) {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "queue", name))
	if err != nil {
		return 0, fmt.Errorf("%s: %w", dev, err)
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: queue/%s: %w", dev, name, err)
	}
	return v, nil
}

// ZeroOut zeroes [off, off+n) of the block device dev with BLKZEROOUT, as
// `blkdiscard -z` does: a WRITE_ZEROES that must not unmap, and zero pages written if
// the device refuses it.
func ZeroOut(dev string, off, n int64) error {
	return rangeIoctl(dev, unix.BLKZEROOUT, off, n)
}

// Discard discards [off, off+n) of the block device dev with BLKDISCARD, as blkdiscard
// does. A device without discards answers EOPNOTSUPP.
func Discard(dev string, off, n int64) error {
	return rangeIoctl(dev, unix.BLKDISCARD, off, n)
}

func rangeIoctl(dev string, req uint, off, n int64) error {
	// A raw open: no runtime poller for a device that this process may serve.
	fd, err := unix.Open(dev, unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s: %w", dev, err)
	}
	defer unix.Close(fd)
	r := [2]uint64{uint64(off), uint64(n)}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(&r[0]))); e != 0 {
		return fmt.Errorf("%s: ioctl %#x [%d, +%d): %w", dev, req, off, n, e)
	}
	return nil
}
