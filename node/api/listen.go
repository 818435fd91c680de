package api

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// DefaultSocket is where the daemon answers unless told otherwise (atrest serve
// --control, the CLI's --control and ATREST_CONTROL).
const DefaultSocket = "/run/atrest/control.sock"

// ErrInUse: a daemon answers on the control socket already.
var ErrInUse = errors.New("the control socket is in use by a running daemon")

// Listen listens on a unix socket at path, mode 0600 (the server checks every peer
// too), creating its directory (0755) if missing. A socket left by a daemon that died
// (nothing answers on it) is replaced; one that answers is refused with ErrInUse; a
// file there that is not a socket is never removed. The socket is removed when the
// listener closes.
//
// Two daemons that replace one stale socket at the same moment can both succeed, the
// second's socket replacing the first's: a daemon is started once, by systemd.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	l, err := net.Listen("unix", path)
	if errors.Is(err, syscall.EADDRINUSE) {
		if err := removeStale(path); err != nil {
			return nil, err
		}
		l, err = net.Listen("unix", path)
	}
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	// bind made it with the umask's mode; it answers nobody before Serve, and the peer
	// check refuses anyone but root in any case.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return l, nil
}

// removeStale removes the socket at path if nothing answers on it.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("control socket %s: a file that is not a socket is there: %w", path, os.ErrExist)
	}
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("control socket %s: %w", path, ErrInUse)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("control socket %s: in use or unusable: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("control socket: remove the stale socket: %w", err)
	}
	return nil
}
