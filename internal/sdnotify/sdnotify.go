// Package sdnotify speaks the two protocols a systemd service uses: sd_notify(3)
// (READY=1, STOPPING=1 and STATUS= on the datagram socket named by NOTIFY_SOCKET)
// and socket activation, sd_listen_fds(3) (listening sockets passed from descriptor 3
// on, counted by LISTEN_FDS, for the process named by LISTEN_PID). It wraps
// github.com/coreos/go-systemd/v22 (packages daemon and activation) with what atrest
// needs on top: a malformed LISTEN_FDS or a descriptor that is not a listening socket
// is an error rather than a silent gap, and NOTIFY_SOCKET is kept (a daemon sends
// READY=1 and later STOPPING=1; cmd/atrest keeps it from child processes itself).
//
// Outside systemd every function does nothing: Notify reports false and Listeners
// returns none. The functions are safe for concurrent use, except Listeners, which
// takes the descriptors once and should be called once, early in main.
package sdnotify

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

// Notify sends a state to the service manager, e.g. "READY=1\nSTATUS=serving 2
// volume(s)" (several assignments joined with newlines). It reports false, with no
// error, when NOTIFY_SOCKET is unset (not run by systemd with Type=notify).
// NOTIFY_SOCKET is an absolute path or, starting with '@', an abstract socket.
func Notify(state string) (bool, error) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return false, nil
	}
	if path[0] != '/' && path[0] != '@' {
		return false, fmt.Errorf("sd_notify: unsupported NOTIFY_SOCKET %q", path)
	}
	sent, err := daemon.SdNotify(false, state)
	if err != nil {
		return sent, fmt.Errorf("sd_notify: %w", err)
	}
	return sent, nil
}

// Ready tells the service manager that start-up is finished, with a status line
// (none if status is empty).
func Ready(status string) (bool, error) {
	if status == "" {
		return Notify(daemon.SdNotifyReady)
	}
	return Notify(daemon.SdNotifyReady + "\nSTATUS=" + status)
}

// Stopping tells the service manager that the service is stopping.
func Stopping() (bool, error) {
	return Notify(daemon.SdNotifyStopping)
}

// Status sets the status line that systemctl status shows.
func Status(status string) (bool, error) {
	return Notify("STATUS=" + status)
}

// maxListenFDs bounds LISTEN_FDS: a larger count is a malformed environment, not
// sockets.
const maxListenFDs = 1024

// Listeners returns the sockets passed by socket activation, in descriptor order,
// or nil when there are none for this process (no LISTEN_FDS, or a LISTEN_PID that
// names another process). Either way it unsets LISTEN_PID, LISTEN_FDS and
// LISTEN_FDNAMES, so that child processes do not take the sockets for theirs, and
// marks the descriptors close-on-exec. A LISTEN_FDS that is not a count, or a
// descriptor that is not a listening socket, is an error (and every descriptor
// passed is closed).
func Listeners() ([]net.Listener, error) {
	if pid, err := strconv.Atoi(os.Getenv("LISTEN_PID")); err == nil && pid == os.Getpid() {
		if fds := os.Getenv("LISTEN_FDS"); fds != "" {
			if n, err := strconv.Atoi(fds); err != nil || n < 0 || n > maxListenFDs {
				unsetenv()
				return nil, fmt.Errorf("socket activation: bad LISTEN_FDS %q", fds)
			}
		}
	}
	files := activation.Files(true)
	var ls []net.Listener
	var errs []error
	for i, f := range files {
		l, err := net.FileListener(f)
		f.Close() // FileListener dups the descriptor
		if err != nil {
			errs = append(errs, fmt.Errorf("socket activation: descriptor %d (%s): %w", 3+i, f.Name(), err))
			continue
		}
		ls = append(ls, l)
	}
	if len(errs) > 0 {
		for _, l := range ls {
			l.Close()
		}
		return nil, errors.Join(errs...)
	}
	return ls, nil
}

func unsetenv() {
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
}
