// Package drivebay is a drive bay for tests: real block devices that a test can pull
// out and put back, as an operator pulls a SATA drive from a hot-swap bay.
//
// A Bay is a FUSE directory (mounted by this process) whose files, the slots, pass
// every read, write, fsync and fallocate through unchanged to image files elsewhere,
// the backing files. A loop device attached over a slot (Attach, with direct I/O, so
// no page cache of the FUSE file sits between) is a real block device: the atrest
// stack, discovery, ext4 or fio use it as they would use /dev/sdc. Pull makes the
// drive go away:
//   - every I/O on the slot fails (PullEIO, PullENODEV) or hangs until Reinsert
//     (PullHang, a drive that stops answering, then fails with ENODEV). The loop
//     device answers with the same errno, as a pulled drive's device does: Linux
//     6.18's loop driver passes ENODEV on (as BLK_STS_OFFLINE, "device offline",
//     which a SCSI disk taken offline gives too) and any other error as EIO;
//   - the slot leaves the directory (with an inotify IN_DELETE for watchers);
//   - its loop devices are detached: at once if nobody holds them open, otherwise
//     when the last holder closes them (losetup -d on an open loop device only sets
//     autoclear), after which /dev/loopN is unbound, as /dev/sdc goes away.
//
// Reinsert brings the same backing file back under a new name, as a new inode, so
// that Attach gives a new loop device (another /dev/loopN) — the drive is back at
// another path. FailRange injects medium errors on a range of a present slot (the
// drive is there, one range fails), for tests that tell a medium error from a pull.
//
// # A drive pull in an end-to-end test
//
//	bay := drivebay.Mount(t, drivebay.Options{})
//	img := ...                                   // a formatted drive image in t.TempDir()
//	if err := bay.Insert("sdc", img); err != nil { t.Fatal(err) }
//	dev, err := bay.Attach("sdc")                // /dev/loopN: register it, serve it
//	...                                          // start the workload (fio, ext4, NBD)
//	bay.Pull("sdc", drivebay.PullEIO)            // I/O now fails; dev goes once closed
//	time.Sleep(pull)                             // the daemon must notice and wait
//	bay.Reinsert("sdc", "sdf")
//	dev2, err := bay.Attach("sdf")               // the drive at a new path
//	...                                          // the workload must finish unharmed
//
// Everything is undone in t.Cleanup, even when the test fails: every slot's I/O fails
// from then on (nothing can hang), the bay's loop devices are detached, and the
// directory is unmounted (lazily, with the FUSE connection aborted, if something still
// holds a file open; the test then fails saying so). Cleanups registered after Mount
// (a file system mounted on a loop device) run before the bay's. A test process killed
// outright (SIGKILL, go test's -timeout) leaves a dead mount and loop devices whose
// I/O fails.
//
// Reads and writes on the loop device should use O_DIRECT: the loop device's own page
// cache answers buffered reads of cached blocks even after a pull, as a real drive's
// does.
//
// # The process serving the bay
//
// The FUSE server runs in the test process. Its serving goroutines never touch the
// mount (they only read and write the backing files), so any other goroutine of the
// test may use the slots and their loop devices. A test must not hold a lock that a
// slot's I/O needs while it waits for that I/O.
//
// # Better pulls on some machines
//
// Where the scsi_debug module can be loaded (modprobe scsi_debug; /sys/bus/pseudo/
// drivers/scsi_debug exists afterwards), a SCSI disk is a better drive: writing 1 to
// /sys/block/sdX/device/delete removes it as a hot unplug does (the device node goes,
// open descriptors get errors), and writing "- - -" to
// /sys/class/scsi_host/hostN/scan brings it back, under a new name while the old one
// is still held. A test can prefer it when /sys/module/scsi_debug exists (or
// `modprobe scsi_debug` succeeds). These sandboxes have neither modprobe nor scsi_debug (nor ublk), so the
// bay is what the suite uses.
//
// A Bay's methods are safe for concurrent use.
package drivebay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/fusefs"
	"github.com/atrest/atrest/internal/testutil"
)

// PullMode says how a pulled drive behaves toward the I/O still sent to it.
type PullMode int

const (
	// PullEIO fails every I/O with EIO.
	PullEIO PullMode = iota + 1
	// PullENODEV fails every I/O with ENODEV.
	PullENODEV
	// PullHang blocks every I/O until Reinsert (or the end of the test), then fails
	// it with ENODEV: a drive that stops answering before it goes.
	PullHang
)

func (m PullMode) String() string {
	switch m {
	case PullEIO:
		return "EIO"
	case PullENODEV:
		return "ENODEV"
	case PullHang:
		return "hang"
	}
	return "PullMode(" + strconv.Itoa(int(m)) + ")"
}

// Options tune a Bay.
type Options struct {
	// BlockSize is the logical block size of the loop devices that Attach makes: 512
	// or 4096; 0 means 4096.
	BlockSize int
}

// Bay is a mounted drive bay.
type Bay struct {
	t         testing.TB
	dir       string
	srv       *fuse.Server
	root      *rootNode
	blockSize int
	losetup   string

	mu      sync.Mutex
	slots   map[string]*slot
	nodes   []*driveNode // every node ever made, for the cleanup
	nextIno uint64
}

// slot is one drive: its current name and node, and the loop devices over it.
type slot struct {
	backing string
	node    *driveNode
	loops   []string
	pulled  bool
}

// Mount mounts an empty bay in a temporary directory and registers its cleanup. It
// needs root, /dev/fuse, loop devices and losetup (the test fails in CI, and skips
// elsewhere, without them).
func Mount(t testing.TB, opts Options) *Bay {
	t.Helper()
	testutil.LoopAndFUSE(t, "losetup")
	bs := opts.BlockSize
	if bs == 0 {
		bs = 4096
	}
	if bs != 512 && bs != 4096 {
		t.Fatalf("drivebay: block size %d (want 512 or 4096)", opts.BlockSize)
	}
	// t.TempDir first: its removal is then a cleanup that runs after the unmount.
	dir := filepath.Join(t.TempDir(), "bay")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	b := &Bay{
		t:         t,
		dir:       dir,
		root:      &rootNode{},
		blockSize: bs,
		losetup:   testutil.Tool(t, "losetup"),
		slots:     make(map[string]*slot),
		nextIno:   2,
	}
	zero := time.Duration(0)
	quiet := log.New(io.Discard, "", 0)
	fsOpts := &fs.Options{
		MountOptions: fuse.MountOptions{
			FsName:            "drivebay",
			Name:              "drivebay",
			MaxWrite:          1 << 20,
			MaxBackground:     128,
			ExtraCapabilities: fuse.CAP_ASYNC_DIO,
			DirectMountStrict: true,
			DirectMountFlags:  syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_NOEXEC,
			DisableXAttrs:     true,
			DisableSplice:     true,
			Logger:            quiet,
		},
		// Slots come and go behind the kernel's back: it must ask every time.
		EntryTimeout:    &zero,
		AttrTimeout:     &zero,
		NegativeTimeout: &zero,
		Logger:          quiet,
	}
	srv, err := fuse.NewServer(fs.NewNodeFS(b.root, fsOpts), dir, &fsOpts.MountOptions)
	if err != nil {
		t.Fatalf("drivebay: mount %s: %v", dir, err)
	}
	b.srv = srv
	go srv.Serve()
	t.Cleanup(b.cleanup)
	if err := srv.WaitMount(); err != nil {
		t.Fatalf("drivebay: mount %s: %v", dir, err)
	}
	// Programs this process starts (losetup, mkfs, fio) must not inherit /dev/fuse.
	if err := fusefs.CloseOnExecFUSE(); err != nil {
		t.Fatalf("drivebay: %v", err)
	}
	return b
}

// Dir returns the bay's directory.
func (b *Bay) Dir() string { return b.dir }

// Path returns the path of the named slot in the bay's directory.
func (b *Bay) Path(name string) string { return filepath.Join(b.dir, name) }

// Insert puts a drive into the bay: backing (a regular file, opened read-write and
// passed through unchanged) appears as the slot name.
func (b *Bay) Insert(name, backing string) error {
	if err := fusefs.CheckName(name); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.slots[name] != nil {
		return fmt.Errorf("drivebay: slot %q is taken", name)
	}
	backing, err := filepath.Abs(backing)
	if err != nil {
		return fmt.Errorf("drivebay: %w", err)
	}
	n, err := b.newNode(backing)
	if err != nil {
		return err
	}
	if err := b.show(name, n); err != nil {
		n.pull(syscall.ENODEV, false)
		return err
	}
	b.slots[name] = &slot{backing: backing, node: n}
	return nil
}

// newNode opens backing and makes a new inode for it. b.mu is held.
func (b *Bay) newNode(backing string) (*driveNode, error) {
	// A raw descriptor: an os.File would be registered with the runtime's poller.
	fd, err := unix.Open(backing, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("drivebay: open %s: %w", backing, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, fmt.Errorf("drivebay: %s is not a regular file (%v)", backing, err)
	}
	n := &driveNode{fd: fd, size: st.Size, ino: b.nextIno}
	b.nextIno++
	b.nodes = append(b.nodes, n)
	return n, nil
}

// show adds n to the directory as name. b.mu is held.
func (b *Bay) show(name string, n *driveNode) error {
	ctx := context.Background()
	ch := b.root.NewInode(ctx, n, fs.StableAttr{Mode: syscall.S_IFREG, Ino: n.ino})
	if !b.root.AddChild(name, ch, false) {
		return fmt.Errorf("drivebay: slot %q is taken", name)
	}
	// The kernel may remember that the name did not exist.
	if errno := b.root.NotifyEntry(name); errno != 0 && errno != syscall.ENOENT {
		return fmt.Errorf("drivebay: notify the kernel of %s: %w", name, errno)
	}
	return nil
}

// Attach attaches a loop device over the slot, with direct I/O and the bay's block
// size, and returns its path. Pull detaches it; so does the cleanup.
func (b *Bay) Attach(name string) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.slots[name]
	if s == nil || s.pulled {
		return "", fmt.Errorf("drivebay: no drive in slot %q", name)
	}
	if err := makeFreeLoopNode(); err != nil {
		return "", err
	}
	out, err := exec.Command(b.losetup, "--find", "--show", "--direct-io=on", "--sector-size", strconv.Itoa(b.blockSize), b.Path(name)).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("drivebay: losetup over %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	dev := strings.TrimSpace(string(out))
	// losetup only warns when the file refuses direct I/O; over FUSE the page cache
	// of the file would hide a pull.
	if dio, err := loopSysfs(dev, "loop/dio"); err != nil || dio != "1" {
		return "", errors.Join(fmt.Errorf("drivebay: %s over %s has no direct I/O (dio=%q, %v)", dev, name, dio, err), b.detach(dev))
	}
	s.loops = append(s.loops, dev)
	return dev, nil
}

// Loops returns the loop devices that Attach made over the slot and that are not
// detached.
func (b *Bay) Loops(name string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if s := b.slots[name]; s != nil {
		return append([]string(nil), s.loops...)
	}
	return nil
}

// Pull pulls the drive out of the slot (see the package doc). The slot's name stays
// taken until Reinsert.
func (b *Bay) Pull(name string, mode PullMode) error {
	var errno syscall.Errno
	switch mode {
	case PullEIO:
		errno = syscall.EIO
	case PullENODEV, PullHang:
		errno = syscall.ENODEV
	default:
		return fmt.Errorf("drivebay: pull mode %v", mode)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.slots[name]
	if s == nil || s.pulled {
		return fmt.Errorf("drivebay: no drive in slot %q", name)
	}
	s.node.pull(errno, mode == PullHang)
	s.pulled = true
	ch := b.root.GetChild(name)
	b.root.RmChild(name)
	if errno := b.root.NotifyDelete(name, ch); errno != 0 && errno != syscall.ENOENT {
		return fmt.Errorf("drivebay: notify the kernel of %s: %w", name, errno)
	}
	var errs []error
	for _, dev := range s.loops {
		errs = append(errs, b.detach(dev))
	}
	s.loops = nil
	return errors.Join(errs...)
}

// Reinsert puts the drive pulled from slot oldName back as slot newName (which may be
// the same name): a new inode over the same backing file, so a new loop device.
// The I/O that the pulled drive holds (PullHang) fails now with ENODEV.
func (b *Bay) Reinsert(oldName, newName string) error {
	if err := fusefs.CheckName(newName); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.slots[oldName]
	if s == nil || !s.pulled {
		return fmt.Errorf("drivebay: no pulled drive from slot %q", oldName)
	}
	if newName != oldName && b.slots[newName] != nil {
		return fmt.Errorf("drivebay: slot %q is taken", newName)
	}
	s.node.release()
	n, err := b.newNode(s.backing)
	if err != nil {
		return err
	}
	if err := b.show(newName, n); err != nil {
		n.pull(syscall.ENODEV, false)
		return err
	}
	delete(b.slots, oldName)
	b.slots[newName] = &slot{backing: s.backing, node: n}
	return nil
}

// FailRange makes every read and write of the slot that touches [off, off+n) fail
// with EIO, a medium error, until heal is called. The drive stays present.
func (b *Bay) FailRange(name string, off, n int64) (heal func(), err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.slots[name]
	if s == nil || s.pulled {
		return nil, fmt.Errorf("drivebay: no drive in slot %q", name)
	}
	if off < 0 || n <= 0 {
		return nil, fmt.Errorf("drivebay: bad range %d+%d", off, n)
	}
	return s.node.failRange(off, n), nil
}

// detach detaches a loop device that the bay attached: at once, or when its last
// holder closes it. The bay never touches it again (its number may be reused).
func (b *Bay) detach(dev string) error {
	if out, err := exec.Command(b.losetup, "--detach", dev).CombinedOutput(); err != nil {
		return fmt.Errorf("drivebay: losetup --detach %s: %w: %s", dev, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// cleanup undoes everything, in an order that cannot hang (see the package doc).
func (b *Bay) cleanup() {
	b.mu.Lock()
	for _, n := range b.nodes {
		n.pull(syscall.ENODEV, false)
		n.release()
	}
	var loops []string
	for _, s := range b.slots {
		loops = append(loops, s.loops...)
		s.loops = nil
	}
	b.mu.Unlock()
	for _, dev := range loops {
		if err := b.detach(dev); err != nil {
			b.t.Error(err)
		}
	}
	// The kernel lets go of a loop device's backing file after the last close,
	// possibly in a work queue: wait until no loop device is over a slot.
	deadline := time.Now().Add(10 * time.Second)
	for _, dev := range loops {
		for {
			backing, err := loopSysfs(dev, "loop/backing_file")
			if err != nil || !strings.HasPrefix(backing, b.dir+"/") {
				break // detached (and maybe reused by someone else since)
			}
			if time.Now().After(deadline) {
				b.t.Errorf("drivebay: %s is still attached over %s: something holds it open", dev, backing)
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	var st unix.Stat_t
	statErr := unix.Stat(b.dir, &st)
	if err := b.srv.Unmount(); err != nil {
		b.t.Errorf("drivebay: unmount %s: %v; unmounting lazily and aborting the FUSE connection", b.dir, err)
		if statErr == nil {
			abortConnection(st.Dev)
		}
		if err := unix.Unmount(b.dir, unix.MNT_DETACH); err != nil {
			b.t.Errorf("drivebay: lazy unmount %s: %v", b.dir, err)
		}
	}
}

// abortConnection aborts the FUSE connection of the file system on device dev: every
// request in flight and to come fails, so nothing waits on this process any more.
func abortConnection(dev uint64) {
	p := fmt.Sprintf("/sys/fs/fuse/connections/%d/abort", unix.Minor(dev)|unix.Major(dev)<<20)
	os.WriteFile(p, []byte("1"), 0)
}

// makeFreeLoopNode makes sure that the loop device losetup --find will take has a
// device node: without udev (containers), one that the kernel creates on demand has
// none, and losetup would fail to open it.
func makeFreeLoopNode() error {
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("drivebay: open /dev/loop-control: %w", err)
	}
	defer unix.Close(ctl)
	n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
	if err != nil {
		return fmt.Errorf("drivebay: find a free loop device: %w", err)
	}
	const loopMajor = 7
	err = unix.Mknod("/dev/loop"+strconv.Itoa(n), unix.S_IFBLK|0o660, int(unix.Mkdev(loopMajor, uint32(n))))
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("drivebay: create /dev/loop%d: %w", n, err)
	}
	return nil
}

// loopSysfs reads a sysfs attribute of the loop device dev (/dev/loopN).
func loopSysfs(dev, attr string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), attr))
	return strings.TrimSuffix(string(b), "\n"), err
}
