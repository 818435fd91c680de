package nbd

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

func TestListenUnix(t *testing.T) {
	dir := filepath.Join(shortDir(t), "run", "atrest")
	sock := filepath.Join(dir, "nbd.sock")
	l, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket mode %v, %v", fi.Mode(), err)
	}
	if di, _ := os.Stat(dir); di.Mode().Perm() != 0o700 {
		t.Fatalf("directory mode %v", di.Mode())
	}
	// A live server on the socket is not displaced.
	if _, err := Listen("unix:" + sock); err == nil || !strings.Contains(err.Error(), "another server") {
		t.Fatalf("second listener on a live socket: %v", err)
	}
	// A stale socket (its server died without removing it) is replaced.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Stat(sock); err != nil {
		t.Fatal("the stale socket should still be there for this test")
	}
	l2, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l2.Close()
	// Anything else in the way is left alone.
	if err := os.WriteFile(sock, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen("unix:" + sock); err == nil {
		t.Fatal("a regular file was replaced by a socket")
	}
	if b, _ := os.ReadFile(sock); string(b) != "precious" {
		t.Fatal("the file was touched")
	}
}

func TestListenSpecs(t *testing.T) {
	for _, bad := range []string{"", "unix:", "tcp:", "udp:1.2.3.4:5", "/path/without/scheme"} {
		if l, err := Listen(bad); err == nil {
			l.Close()
			t.Errorf("Listen(%q) succeeded", bad)
		}
	}
	checkLeaks(t)
	l, err := Listen("tcp:127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(ServerConfig{})
	s.AddExport(Export{Name: "vol", Device: blockdev.NewMem(1 << 20)})
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background(), l) }()
	c, err := Dial(context.Background(), "nbd://"+l.Addr().String()+"/vol", ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt([]byte("over tcp"), 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c, err = Dial(context.Background(), "tcp:"+l.Addr().String(), ClientOptions{Export: "vol"})
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8)
	if _, err := c.ReadAt(b, 0); err != nil || string(b) != "over tcp" {
		t.Fatalf("%q %v", b, err)
	}
	c.Close()
	s.Shutdown(context.Background())
	<-done
}

func TestParseAddress(t *testing.T) {
	good := map[string]Address{
		"unix:/run/atrest/nbd.sock":                   {"unix", "/run/atrest/nbd.sock", ""},
		"tcp:127.0.0.1:10809":                         {"tcp", "127.0.0.1:10809", ""},
		"tcp:localhost":                               {"tcp", "localhost:10809", ""},
		"tcp:[::1]:99":                                {"tcp", "[::1]:99", ""},
		"nbd://example.com/vol":                       {"tcp", "example.com:10809", "vol"},
		"nbd://127.0.0.1:1234/":                       {"tcp", "127.0.0.1:1234", ""},
		"nbd://[::1]":                                 {"tcp", "[::1]:10809", ""},
		"nbd://h/a%20b":                               {"tcp", "h:10809", "a b"},
		"nbd+unix:///vol?socket=/run/atrest/nbd.sock": {"unix", "/run/atrest/nbd.sock", "vol"},
		"nbd+unix:///?socket=/tmp/s":                  {"unix", "/tmp/s", ""},
		"nbd+unix:///x?socket=%2Ftmp%2Fwith%20space":  {"unix", "/tmp/with space", "x"},
	}
	for in, want := range good {
		got, err := ParseAddress(in)
		if err != nil || got != want {
			t.Errorf("ParseAddress(%q) = %+v, %v; want %+v", in, got, err, want)
			continue
		}
		// String gives a URI that parses back to the same address.
		if back, err := ParseAddress(got.String()); err != nil || back != got {
			t.Errorf("round trip of %q through %q: %+v, %v", in, got.String(), back, err)
		}
	}
	for _, bad := range []string{"", "unix:", "tcp:", "nbds://h/x", "nbd+unix:///x", "nbd+unix://host/x?socket=/s",
		"nbd:///x", "http://h/x", "nbd+unix:///x?socket=/s&tls=1", "nbd://h/x?socket=/s", "/just/a/path"} {
		if a, err := ParseAddress(bad); err == nil {
			t.Errorf("ParseAddress(%q) = %+v, want an error", bad, a)
		}
	}
}
