package nbd

import (
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/sdnotify"
)

// TestMain doubles as a small NBD server process for the tests that kill or signal a
// server: with NBD_TEST_SERVE set, the test binary serves NBD_TEST_FILE (through
// blockcrypt when NBD_TEST_KEY holds a hex key) on NBD_TEST_LISTEN or on the sockets of
// systemd socket activation, reports READY=1 through NOTIFY_SOCKET and stops cleanly on
// SIGTERM, as `atrest serve` will.
func TestMain(m *testing.M) {
	if os.Getenv("NBD_TEST_SERVE") != "" {
		if err := helperServe(); err != nil {
			fmt.Fprintln(os.Stderr, "helper server:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func helperServe() error {
	ls, err := sdnotify.Listeners()
	if err != nil {
		return err
	}
	if len(ls) == 0 {
		l, err := Listen(os.Getenv("NBD_TEST_LISTEN"))
		if err != nil {
			return err
		}
		ls = []net.Listener{l}
	}
	f, err := blockdev.OpenFile(os.Getenv("NBD_TEST_FILE"), blockdev.FileOptions{})
	if err != nil {
		return err
	}
	var dev blockdev.Device = f
	if k := os.Getenv("NBD_TEST_KEY"); k != "" {
		key, err := hex.DecodeString(k)
		if err != nil {
			return err
		}
		if dev, err = blockcrypt.New(f, blockcrypt.Config{Key: key}); err != nil {
			return err
		}
	}
	var ready atomic.Int32
	srv := NewServer(ServerConfig{Ready: func(net.Addr) {
		if int(ready.Add(1)) == len(ls) {
			sdnotify.Ready("serving")
		}
	}})
	if err := srv.AddExport(Export{Device: dev}); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	errc := make(chan error, len(ls))
	for _, l := range ls {
		go func() { errc <- srv.Serve(context.Background(), l) }()
	}
	<-ctx.Done()
	sdnotify.Stopping()
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return err
	}
	for range ls {
		<-errc
	}
	return dev.Close()
}

// helper is a server process started from the test binary.
type helper struct {
	cmd    *exec.Cmd
	notify *net.UnixConn
	exited chan struct{} // closed when the process exited, with its status in err
	err    error
}

// notifySocket makes a datagram socket standing in for systemd's NOTIFY_SOCKET.
func notifySocket(t *testing.T) (*net.UnixConn, string) {
	t.Helper()
	p := filepath.Join(shortDir(t), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: p, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, p
}

// startHelper starts a server process; extra holds environment variables and files
// passed from descriptor 3 on, and wrap, if set, prefixes the command (for LISTEN_PID).
func startHelper(t *testing.T, env []string, files []*os.File, wrap ...string) *helper {
	t.Helper()
	notify, np := notifySocket(t)
	args := append(wrap, os.Args[0], "-test.run=^$")
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), append(env, "NBD_TEST_SERVE=1", "NOTIFY_SOCKET="+np)...)
	cmd.ExtraFiles = files
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helper{cmd: cmd, notify: notify, exited: make(chan struct{})}
	go func() { h.err = cmd.Wait(); close(h.exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-h.exited
	})
	h.expect(t, "READY=1")
	return h
}

// expect waits for a notification containing want.
func (h *helper) expect(t *testing.T, want string) {
	t.Helper()
	buf := make([]byte, 4096)
	deadline := time.Now().Add(30 * time.Second)
	for {
		_ = h.notify.SetReadDeadline(deadline)
		n, err := h.notify.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %q from the server: %v", want, err)
		}
		if strings.Contains(string(buf[:n]), want) {
			return
		}
	}
}
