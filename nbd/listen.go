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

	"golang.org/x/sys/unix"
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
			return nil, fmt.Errorf("listen on %s: another server answers on this socket", path)
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

// SystemdListeners returns the sockets passed by systemd socket activation
// (sd_listen_fds(3): LISTEN_PID names this process, LISTEN_FDS counts the descriptors
// from 3), or nil when there are none. It unsets the variables, so that child
// processes do not take the sockets for theirs, and marks the descriptors close-on-exec.
func SystemdListeners() ([]net.Listener, error) {
	pid, fds := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS")
	names := os.Getenv("LISTEN_FDNAMES")
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	if pid == "" || fds == "" {
		return nil, nil
	}
	if p, err := strconv.Atoi(pid); err != nil || p != os.Getpid() {
		return nil, nil
	}
	n, err := strconv.Atoi(fds)
	if err != nil || n < 0 || n > 1024 {
		return nil, fmt.Errorf("socket activation: bad LISTEN_FDS %q", fds)
	}
	nameList := strings.Split(names, ":")
	var ls []net.Listener
	for i := range n {
		fd := 3 + i
		unix.CloseOnExec(fd)
		name := "LISTEN_FD_" + strconv.Itoa(fd)
		if i < len(nameList) && nameList[i] != "" {
			name = nameList[i]
		}
		f := os.NewFile(uintptr(fd), name)
		l, err := net.FileListener(f)
		f.Close() // FileListener dups the descriptor
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, fmt.Errorf("socket activation: descriptor %d: %w", fd, err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// Notify sends a state to the service manager (sd_notify(3)) over the datagram socket
// named by NOTIFY_SOCKET, e.g. "READY=1", "STOPPING=1" or "STATUS=serving 2 exports";
// several may be joined with newlines. It reports false, with no error, when
// NOTIFY_SOCKET is unset (not run by systemd with Type=notify).
func Notify(state string) (bool, error) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return false, nil
	}
	if path[0] != '/' && path[0] != '@' {
		return false, fmt.Errorf("sd_notify: unsupported NOTIFY_SOCKET %q", path)
	}
	if path[0] == '@' {
		path = "\x00" + path[1:] // abstract socket
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return false, fmt.Errorf("sd_notify: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return false, fmt.Errorf("sd_notify: %w", err)
	}
	return true, nil
}
