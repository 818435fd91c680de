// Package volmount puts a file system on a file and takes it off again: a loop device
// with direct I/O over the file (typically a FUSE file of package fusefs), ext4 created
// only when the device holds nothing, the mount; and the reverse, in order, also for
// the pieces a crash left behind. For a stack whose FUSE server can no longer answer,
// AbortFUSE fails every request on the FUSE file at once, so that the lazy unmount
// (Unmount) and detach (DetachLazily) that follow wait for nothing.
//
// It needs root and talks to the kernel (loop ioctls, sysfs, mountinfo, umount(2)) and
// to util-linux and e2fsprogs (blkid, mount, mkfs.ext4). Never call it from a goroutine
// that serves the FUSE file it works on, or the process deadlocks on itself.
//
// Concurrency: the functions keep no state and may be called concurrently for
// different files and mount points. Work on one stack (Setup and Teardown of the same
// mount point) must not overlap. A Loop's methods must not be called concurrently.
package volmount

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Options describe a volume to mount.
type Options struct {
	// FSType is the file system type; "" means ext4. Only ext4 is ever created.
	FSType string
	// MountOptions are mount(8) -o options, such as "noatime"; "ro" is added under
	// ReadOnly.
	MountOptions string
	// Label is the label of a newly created file system.
	Label string
	// ReadOnly attaches and mounts read-only (and never creates a file system).
	ReadOnly bool
	// Discard lets mkfs discard the device before it creates a file system. Whether
	// discards reach the drive at all is up to the FUSE file below
	// (its Device's Caps); mount -o discard is a separate choice.
	Discard bool
	// BlockSize is the logical block size of the loop device (see AttachOptions).
	BlockSize int
	// AfterAttach, if set, runs once the loop device is attached, before anything
	// reads or writes it (Probe, MakeFS, Mount): the place to adjust the device, such
	// as turning write-zeroes or discards off (ZeroOut, Discard). An error undoes the
	// attach and fails Setup.
	AfterAttach func(loop string) error
}

// Volume is a mounted stack.
type Volume struct {
	File       string // the backing file
	Loop       string // the loop device, such as /dev/loop3
	Mountpoint string
	FSType     string
	Created    bool // the file system was created by Setup
}

// Setup attaches file to a loop device, creates an ext4 file system if the device
// holds no signature at all (an error naming what was found if it holds something
// other than opts.FSType), and mounts it on mountpoint, created if missing. On failure
// it undoes what it did. The loop device detaches itself when the file system is
// unmounted.
func Setup(file, mountpoint string, opts Options) (*Volume, error) {
	fsType := opts.FSType
	if fsType == "" {
		fsType = "ext4"
	}
	l, err := Attach(file, AttachOptions{ReadOnly: opts.ReadOnly, BlockSize: opts.BlockSize})
	if err != nil {
		return nil, err
	}
	// Until the file system is mounted, the Loop's descriptor is what keeps the
	// device; releasing it detaches the device (auto-clear), also if we fail.
	defer l.Release()
	v := &Volume{File: l.File(), Loop: l.Path(), Mountpoint: mountpoint, FSType: fsType}
	if opts.AfterAttach != nil {
		if err := opts.AfterAttach(l.Path()); err != nil {
			return nil, fmt.Errorf("set up %s: %w", file, err)
		}
	}
	sig, err := Probe(l.Path())
	if err != nil {
		return nil, fmt.Errorf("set up %s: %w", file, err)
	}
	switch {
	case sig.Empty() && opts.ReadOnly:
		return nil, fmt.Errorf("set up %s: it holds no file system, and read-only mode cannot create one", file)
	case sig.Empty():
		if err := MakeFS(l.Path(), fsType, MkfsOptions{Label: opts.Label, Discard: opts.Discard}); err != nil {
			return nil, fmt.Errorf("set up %s: %w", file, err)
		}
		v.Created = true
	case sig.Type != fsType:
		return nil, fmt.Errorf("set up %s: it holds %s, not %s: %w", file, sig, fsType, ErrNotEmpty)
	}
	mo := opts.MountOptions
	if opts.ReadOnly {
		mo = strings.TrimPrefix(mo+",ro", ",")
	}
	if err := Mount(l.Path(), mountpoint, fsType, mo); err != nil {
		return nil, fmt.Errorf("set up %s: %w", file, err)
	}
	return v, nil
}

// Mount mounts the block device dev on mountpoint (created with mode 0755 if missing)
// as fsType with the mount(8) options given ("" for none). A mount point that already
// has something mounted on it is refused.
func Mount(dev, mountpoint, fsType, options string) error {
	mp, err := filepath.Abs(mountpoint)
	if err != nil {
		return fmt.Errorf("mount %s: %w", dev, err)
	}
	if err := os.MkdirAll(mp, 0o755); err != nil {
		return fmt.Errorf("mount %s: %w", dev, err)
	}
	mounts, err := readMounts()
	if err != nil {
		return fmt.Errorf("mount %s: %w", dev, err)
	}
	if m, ok := mountAt(mounts, mp); ok {
		return fmt.Errorf("mount %s: %s already has %s (%s) mounted on it", dev, mp, m.source, m.fsType)
	}
	bin, err := exec.LookPath("mount")
	if err != nil {
		return fmt.Errorf("mount %s: mount (util-linux) is not installed: %w", dev, err)
	}
	args := []string{"-t", fsType}
	if options != "" {
		args = append(args, "-o", options)
	}
	args = append(args, dev, mp)
	cmd := exec.Command(bin, args...)
	cmd.Env = []string{"LC_ALL=C", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mount %s on %s: %w: %s", dev, mp, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Unmount unmounts the file system mounted on mountpoint; it fails with EBUSY while
// files are open there. With MNT_DETACH semantics (lazy) only when lazy is set.
func Unmount(mountpoint string, lazy bool) error {
	flags := 0
	if lazy {
		flags = unix.MNT_DETACH
	}
	if err := unix.Unmount(mountpoint, flags); err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("unmount %s: %w (files are open there; `fuser -vm %s` lists who holds them)", mountpoint, err, mountpoint)
		}
		return fmt.Errorf("unmount %s: %w", mountpoint, err)
	}
	return nil
}

// Teardown removes whatever is left of a stack, given either its mount point or its
// backing file, in order: the file system mounts on the loop devices of the file, the
// loop devices, then the fusefs mount (type fuse.atrest) that holds the file in its
// root: dead after a crash, lazily detached if it cannot be unmounted at once. It is
// idempotent: with nothing left it does nothing. Given a mount point whose file
// system is already gone, it cannot find the file: call it with the file as well.
// It does not wait for a FUSE server to exit; it ends its mount, after which the
// server's Wait returns.
func Teardown(target string) error {
	target, err := filepath.Abs(target)
	if err != nil {
		return fmt.Errorf("tear down: %w", err)
	}
	mounts, err := readMounts()
	if err != nil {
		return fmt.Errorf("tear down %s: %w", target, err)
	}
	loops, err := boundLoops()
	if err != nil {
		return fmt.Errorf("tear down %s: list loop devices: %w", target, err)
	}
	file := target
	if m, ok := mountAt(mounts, target); ok && m.major == loopMajor {
		for _, l := range loops {
			if l.major == m.major && l.minor == m.minor {
				file = l.backing
			}
		}
	}
	var errs []error
	for _, l := range loops {
		if l.backing != file {
			continue
		}
		// Every mount of the loop device, topmost first.
		for i := len(mounts) - 1; i >= 0; i-- {
			m := mounts[i]
			if m.major == l.major && m.minor == l.minor {
				if err := Unmount(m.mountpoint, false); err != nil {
					errs = append(errs, fmt.Errorf("tear down %s: %w", target, err))
				}
			}
		}
		if err := Detach(l.path()); err != nil {
			errs = append(errs, fmt.Errorf("tear down %s: %w", target, err))
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	dir := filepath.Dir(file)
	if m, ok := mountAt(mounts, dir); ok && m.fsType == fuseType {
		if err := unmountFUSE(dir); err != nil {
			return fmt.Errorf("tear down %s: %w", target, err)
		}
	}
	return nil
}

// fuseType is the type of the FUSE mounts of package fusefs; Teardown ends no other.
const fuseType = "fuse.atrest"

// unmountFUSE ends the FUSE mount on dir. A dead one (its server gone) answers
// ENOTCONN to everything but still unmounts; if it is busy, it is detached lazily so
// that nothing new can reach it.
func unmountFUSE(dir string) error {
	err := unix.Unmount(dir, 0)
	if errors.Is(err, unix.EBUSY) {
		err = unix.Unmount(dir, unix.MNT_DETACH)
	}
	if err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: no longer a mount point
		return fmt.Errorf("unmount the FUSE mount %s: %w", dir, err)
	}
	return nil
}
