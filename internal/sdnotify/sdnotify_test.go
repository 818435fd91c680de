package sdnotify

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestMain doubles as the process that socket activation starts: with
// SDNOTIFY_TEST_CHILD set, the test binary calls Listeners and prints what it got and
// what is left of the environment.
func TestMain(m *testing.M) {
	if os.Getenv("SDNOTIFY_TEST_CHILD") != "" {
		ls, err := Listeners()
		for _, l := range ls {
			fmt.Printf("listener %s:%s\n", l.Addr().Network(), l.Addr().String())
		}
		if err != nil {
			fmt.Printf("error %v\n", err)
		}
		fmt.Printf("env %q %q %q\n", os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS"), os.Getenv("LISTEN_FDNAMES"))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// activate runs the test binary as systemd would start an activated service: file at
// descriptor 3, env added, and LISTEN_PID naming the process itself unless env sets
// it. It returns what the child printed.
func activate(t *testing.T, file *os.File, env ...string) string {
	t.Helper()
	script := `export LISTEN_PID=$$; exec "$@"`
	for _, e := range env {
		if strings.HasPrefix(e, "LISTEN_PID=") {
			script = `exec "$@"`
		}
	}
	cmd := exec.Command("/bin/sh", "-c", script, "sh", os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), append(env, "SDNOTIFY_TEST_CHILD=1")...)
	if file != nil {
		cmd.ExtraFiles = []*os.File{file}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	return string(out)
}

func unixListenerFile(t *testing.T) (*os.File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	f, err := l.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, path
}

func TestListeners(t *testing.T) {
	f, path := unixListenerFile(t)
	unset := `env "" "" ""` + "\n"

	out := activate(t, f, "LISTEN_FDS=1", "LISTEN_FDNAMES=nbd")
	if want := "listener unix:" + path + "\n" + unset; out != want {
		t.Errorf("activated: got %q, want %q", out, want)
	}
	// Sockets for another process are left alone, but the variables still go.
	if out := activate(t, f, "LISTEN_PID=1", "LISTEN_FDS=1"); out != unset {
		t.Errorf("LISTEN_PID of another process: got %q", out)
	}
	// Outside socket activation: nothing.
	if out := activate(t, nil); out != unset {
		t.Errorf("no activation: got %q", out)
	}
	for _, bad := range []string{"x", "-1", "100000"} {
		out := activate(t, f, "LISTEN_FDS="+bad)
		if !strings.Contains(out, "error socket activation: bad LISTEN_FDS") || !strings.HasSuffix(out, unset) {
			t.Errorf("LISTEN_FDS=%s: got %q", bad, out)
		}
	}
	// A descriptor that is not a listening socket is an error, not a gap.
	reg, err := os.Create(filepath.Join(t.TempDir(), "file"))
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	out = activate(t, reg, "LISTEN_FDS=1")
	if !strings.HasPrefix(out, "error socket activation: descriptor 3") || !strings.HasSuffix(out, unset) {
		t.Errorf("regular file passed: got %q", out)
	}
}

// notifySocket makes a datagram socket standing in for systemd's NOTIFY_SOCKET.
func notifySocket(t *testing.T, path string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func receive(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	b := make([]byte, 4096)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := c.Read(b)
	if err != nil {
		t.Fatal(err)
	}
	return string(b[:n])
}

func TestNotify(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if sent, err := Notify("READY=1"); sent || err != nil {
		t.Fatalf("without NOTIFY_SOCKET: %v %v", sent, err)
	}
	path := filepath.Join(t.TempDir(), "notify")
	conn := notifySocket(t, path)
	t.Setenv("NOTIFY_SOCKET", path)
	if sent, err := Notify("READY=1\nSTATUS=serving 1 export"); !sent || err != nil {
		t.Fatalf("%v %v", sent, err)
	}
	if got := receive(t, conn); got != "READY=1\nSTATUS=serving 1 export" {
		t.Fatalf("%q", got)
	}
	// NOTIFY_SOCKET stays for the next state.
	for _, c := range []struct {
		send func() (bool, error)
		want string
	}{
		{func() (bool, error) { return Ready("serving 2 volume(s)") }, "READY=1\nSTATUS=serving 2 volume(s)"},
		{func() (bool, error) { return Ready("") }, "READY=1"},
		{func() (bool, error) { return Status("rotating") }, "STATUS=rotating"},
		{Stopping, "STOPPING=1"},
	} {
		if sent, err := c.send(); !sent || err != nil {
			t.Fatalf("%q: %v %v", c.want, sent, err)
		}
		if got := receive(t, conn); got != c.want {
			t.Fatalf("got %q, want %q", got, c.want)
		}
	}
	t.Setenv("NOTIFY_SOCKET", "relative")
	if _, err := Notify("READY=1"); err == nil {
		t.Fatal("relative NOTIFY_SOCKET accepted")
	}
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "nobody-listens"))
	if sent, err := Notify("READY=1"); sent || err == nil {
		t.Fatalf("NOTIFY_SOCKET with nobody listening: %v %v", sent, err)
	}
}

// TestNotifyAbstract: NOTIFY_SOCKET=@name is a socket in the abstract namespace.
func TestNotifyAbstract(t *testing.T) {
	name := fmt.Sprintf("atrest-sdnotify-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	conn := notifySocket(t, "@"+name)
	t.Setenv("NOTIFY_SOCKET", "@"+name)
	if sent, err := Notify("READY=1"); !sent || err != nil {
		t.Fatalf("%v %v", sent, err)
	}
	if got := receive(t, conn); got != "READY=1" {
		t.Fatalf("%q", got)
	}
}
