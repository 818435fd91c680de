package nbd

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Listen opens a listener from a spec:
//   - "unix:PATH": a unix socket of mode 0600. A missing directory is created with mode
//     0700. An existing socket file is removed only if nothing answers on it (a stale
//     socket left by a crash); a live one, or any other kind of file, is an error.
//   - "tcp:HOST:PORT" (or "tcp:HOST", port 10809): a TCP socket. Use a loopback host
//     unless clients are remote: NBD carries the plaintext of the volume.
func Listen(spec string) (net.Listener, error) {
	network, addr, ok := strings.Cut(spec, ":")
	if !ok || addr == "" {
		return nil, fmt.Errorf("listen spec %q: want unix:PATH or tcp:HOST:PORT", spec)
	}
	switch network {
	case "unix":
		return listenUnix(addr)
	case "tcp":
		if _, _, err := net.SplitHostPort(addr); err != nil {
			addr = net.JoinHostPort(strings.Trim(addr, "[]"), strconv.Itoa(DefaultPort))
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen on tcp %s: %w", addr, err)
		}
		return l, nil
	default:
		return nil, fmt.Errorf("listen spec %q: unknown network %q (want unix or tcp)", spec, network)
	}
}

// ErrSocketInUse: Listen found a server answering on the unix socket it was to create.
var ErrSocketInUse = errors.New("another server answers on this socket")

func listenUnix(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("listen on %s: a file that is not a socket is in the way", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("listen on %s: %w", path, ErrSocketInUse)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("listen on %s: probing the existing socket: %w", path, err)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// The socket is created with the umask's mode; the directory (0700 when created
	// here) keeps others out until the chmod.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod socket: %w", err)
	}
	return l, nil
}
