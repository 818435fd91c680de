package e2e

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/testutil"
)

// activationSocket makes a listening unix socket as systemd would for a .socket unit
// and returns its file, to be inherited as descriptor 3. The test keeps the socket
// file; the daemon must not remove it.
func activationSocket(t *testing.T, path string) *os.File {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	f, err := l.File() // a duplicate, without close-on-exec once inherited
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestServeSocketActivation passes a listening socket the way systemd does (LISTEN_FDS,
// LISTEN_PID naming the daemon itself) and serves through it: READY=1 comes, clients
// connect through the inherited socket, --listen is ignored, SIGTERM stops cleanly.
// A LISTEN_PID naming another process is not for the daemon, which then listens on
// --listen. And systemd's own systemd-socket-activate starts the daemon on the first
// connection, which is served.
func TestServeSocketActivation(t *testing.T) {
	t.Parallel()
	testutil.Tool(t, "nbdinfo")
	c := newCluster(t)
	img := c.format("vol", "32M")
	sock := filepath.Join(c.dir, "activated.sock")
	other := filepath.Join(c.dir, "listen.sock")
	listenArgs := []string{"--listen", "unix:" + other, img}

	// sh sets LISTEN_PID to its own pid, which exec hands on to atrest.
	d := c.spawn(spawnOpts{
		raw:   true,
		sock:  sock,
		argv:  []string{"/bin/sh", "-c", `export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=nbd; exec "$0" "$@"`, atrestBin},
		args:  listenArgs,
		extra: []*os.File{activationSocket(t, sock)},
	})
	d.waitReady()
	if _, err := os.Lstat(other); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("with a socket from systemd the daemon listened on --listen too (%v)", err)
	}
	if !strings.Contains(d.stderr.String(), "on unix:"+sock+"\n") {
		t.Errorf("the daemon does not say it serves on %s:\n%s", sock, d.stderr.String())
	}
	out := mustProg(t, "", 30*time.Second, testutil.Tool(t, "nbdinfo"), "--size", d.uri("vol"))
	if strings.TrimSpace(out) != strconv.Itoa(16<<20) {
		t.Errorf("nbdinfo --size through the inherited socket: %q", out)
	}
	cl := d.dial("")
	data := randomBytes(64<<10, 7)
	if _, err := cl.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(); err != nil {
		t.Fatal(err)
	}
	cl.Close()
	d.stop()
	if _, err := os.Lstat(sock); err != nil {
		t.Errorf("the daemon removed the socket it was given: %v", err)
	}

	// LISTEN_PID of another process: the socket is not for this daemon.
	d = c.spawn(spawnOpts{
		raw:   true,
		sock:  other,
		env:   []string{"LISTEN_PID=1", "LISTEN_FDS=1"},
		args:  listenArgs,
		extra: []*os.File{activationSocket(t, filepath.Join(c.dir, "not-mine.sock"))},
	})
	d.waitReady()
	cl = d.dial("vol")
	got := make([]byte, len(data))
	if _, err := cl.ReadAt(got, 4096); err != nil || string(got) != string(data) {
		t.Errorf("read back through --listen after a restart: %v, equal %v", err, string(got) == string(data))
	}
	cl.Close()
	d.stop()
	if _, err := os.Lstat(other); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("--listen socket left after a clean stop: %v", err)
	}

	// systemd-socket-activate listens, and starts the daemon when a client connects.
	ssa := testutil.Tool(t, "systemd-socket-activate")
	lazy := filepath.Join(c.dir, "lazy.sock")
	d = c.spawn(spawnOpts{
		raw:  true,
		sock: lazy,
		argv: []string{ssa, "--listen=" + lazy, "-E", "ATREST_KEYSTORE=" + c.ks, "-E", "NOTIFY_SOCKET", atrestBin},
		args: []string{img},
	})
	// Wait for the socket, then connect: the first client starts the daemon.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Lstat(lazy); err == nil {
			break
		}
		select {
		case <-d.done:
			t.Fatalf("systemd-socket-activate exited: %s", d.stderr.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("systemd-socket-activate made no socket in 30 s: %s", d.stderr.String())
		}
	}
	out = mustProg(t, "", 60*time.Second, testutil.Tool(t, "nbdinfo"), "--size", "nbd+unix:///?socket="+lazy)
	if strings.TrimSpace(out) != strconv.Itoa(16<<20) {
		t.Errorf("nbdinfo --size through systemd-socket-activate: %q", out)
	}
	d.waitReady()
	d.stop()
}
