package discovery

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"golang.org/x/sys/unix"
)

// ueventSocket receives the kernel's uevents (NETLINK_KOBJECT_UEVENT, multicast group
// 1: the kernel's own messages, not udev's).
type ueventSocket struct {
	f *os.File // non-blocking, so the runtime polls it and Close ends a Read
}

// ueventBuffer is the receive buffer asked for, so that a burst of uevents (a shelf
// of drives powering up) is not dropped; ENOBUFS, if it is, causes a rescan anyway.
const ueventBuffer = 1 << 20

func openUevents() (*ueventSocket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return nil, fmt.Errorf("netlink uevent socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind netlink uevent socket: %w", err)
	}
	// SO_RCVBUFFORCE passes the system's limit with CAP_NET_ADMIN; SO_RCVBUF is
	// capped by it.
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, ueventBuffer) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, ueventBuffer)
	}
	return &ueventSocket{f: os.NewFile(uintptr(fd), "netlink-uevent")}, nil
}

// run reads uevents until the socket is closed, and calls poke for each one of the
// block subsystem, and after an overflow.
func (u *ueventSocket) run(poke func(), log *slog.Logger) {
	buf := make([]byte, 64<<10)
	for {
		n, err := u.f.Read(buf)
		switch {
		case errors.Is(err, os.ErrClosed):
			return
		case errors.Is(err, unix.ENOBUFS):
			log.Debug("discovery: uevents were dropped (receive buffer full); rescanning")
			poke()
		case err != nil:
			log.Warn("discovery: reading kernel uevents failed; block devices are seen by the periodic rescan from now on", "err", err)
			return
		case blockUevent(buf[:n]):
			poke()
		}
	}
}

func (u *ueventSocket) close() { u.f.Close() }

// blockUevent reports whether msg ("ACTION@DEVPATH\0KEY=VALUE\0...") is a uevent of
// the block subsystem. Its content is never trusted beyond that: a uevent only
// causes a rescan.
func blockUevent(msg []byte) bool {
	for field := range bytes.SplitSeq(msg, []byte{0}) {
		if bytes.Equal(field, []byte("SUBSYSTEM=block")) {
			return true
		}
	}
	return false
}

// inotifyMask: names created, deleted or moved in or out, files closed after
// writing, and the directory itself deleted or moved.
const inotifyMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO |
	unix.IN_CLOSE_WRITE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// dirWatcher watches directories with inotify. Its sync and close are called by
// the Watcher's scanning goroutine and by Close after that goroutine has ended, so
// never at the same time; run reads in a goroutine of its own.
type dirWatcher struct {
	f   *os.File
	fd  int            // f's descriptor, for inotify_add_watch; valid until close
	wds map[string]int // directory -> watch descriptor
}

func newDirWatcher() (*dirWatcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("inotify_init1: %w", err)
	}
	return &dirWatcher{f: os.NewFile(uintptr(fd), "inotify"), fd: fd, wds: make(map[string]int)}, nil
}

// sync watches exactly dirs. A directory that does not exist (yet) is tried again
// at the next sync; one that was replaced or moved away gets a new watch.
func (d *dirWatcher) sync(dirs []string, log *slog.Logger) {
	want := make(map[string]bool, len(dirs))
	for _, dir := range dirs {
		want[dir] = true
		wd, err := unix.InotifyAddWatch(d.fd, dir, inotifyMask)
		if err != nil {
			if !errors.Is(err, unix.ENOENT) {
				log.Debug("discovery: cannot watch directory", "dir", dir, "err", err)
			}
			delete(d.wds, dir)
			continue
		}
		if old, ok := d.wds[dir]; ok && old != wd {
			unix.InotifyRmWatch(d.fd, uint32(old)) // the old directory, moved away
		}
		d.wds[dir] = wd
	}
	for dir, wd := range d.wds {
		if !want[dir] {
			unix.InotifyRmWatch(d.fd, uint32(wd))
			delete(d.wds, dir)
		}
	}
}

// run reads events until the descriptor is closed, and calls poke for each batch.
// Which event it was does not matter: any change in a watched directory is a reason
// to rescan (IN_Q_OVERFLOW, lost events, included).
func (d *dirWatcher) run(poke func(), log *slog.Logger) {
	buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
	for {
		n, err := d.f.Read(buf)
		if errors.Is(err, os.ErrClosed) {
			return
		}
		if err != nil {
			log.Warn("discovery: reading inotify events failed; image files are seen by the periodic rescan from now on", "err", err)
			return
		}
		if n >= unix.SizeofInotifyEvent {
			poke()
		}
	}
}

func (d *dirWatcher) close() { d.f.Close() }
