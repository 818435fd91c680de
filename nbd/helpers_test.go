package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/testutil"
)

// checkLeaks fails the test if goroutines started during it are still running once
// it ended (a goleak-style check on runtime.NumGoroutine, which settles within 5 s).
// Register it first, so that it runs after every other cleanup.
func checkLeaks(t testing.TB) {
	t.Helper()
	base := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= base {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("%d goroutines leaked (%d before, %d now):\n%s", n-base, base, n, buf)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// shortDir returns a temporary directory with a short path (unix socket paths are
// limited to 107 bytes; t.TempDir can be longer).
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "nbdt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// testServer is a Server serving on a unix socket (or TCP) for one test.
type testServer struct {
	*Server
	sock    string // the unix socket; "" on TCP
	addr    string // "unix:PATH" or "tcp:127.0.0.1:PORT"
	network string // for net.Dial: "unix" or "tcp"
	dialTo  string // for net.Dial: the path or host:port
	done    chan error
}

// startServer serves the exports on a fresh unix socket and shuts the server down at
// the end of the test.
func startServer(t testing.TB, cfg ServerConfig, exports ...Export) *testServer {
	t.Helper()
	return startServerOn(t, "unix", cfg, exports...)
}

// startServerOn is startServer on a unix socket or on TCP (network "tcp": a free port
// of 127.0.0.1).
func startServerOn(t testing.TB, network string, cfg ServerConfig, exports ...Export) *testServer {
	t.Helper()
	var sock, spec string
	switch network {
	case "unix":
		sock = filepath.Join(shortDir(t), "nbd.sock")
		spec = "unix:" + sock
	case "tcp":
		spec = "tcp:127.0.0.1:0"
	default:
		t.Fatalf("network %q", network)
	}
	l, err := Listen(spec)
	if err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	user := cfg.Ready
	cfg.Ready = func(a net.Addr) {
		if user != nil {
			user(a)
		}
		close(ready)
	}
	if cfg.Logger == nil {
		cfg.Logger = testutil.Logger(t)
	}
	s := NewServer(cfg)
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	ts := &testServer{Server: s, sock: sock, addr: network + ":" + l.Addr().String(), network: network, dialTo: l.Addr().String(), done: make(chan error, 1)}
	go func() { ts.done <- s.Serve(context.Background(), l) }()
	<-ready
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-ts.done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return ts
}

// rawConn speaks the protocol byte by byte, for tests of the server's answers.
type rawConn struct {
	t  testing.TB
	nc net.Conn
}

func dialRaw(t testing.TB, sock string) *rawConn {
	t.Helper()
	return dialRawNet(t, "unix", sock)
}

// dialRawNet is dialRaw on a network: "unix" with a socket path, "tcp" with host:port.
func dialRawNet(t testing.TB, network, addr string) *rawConn {
	t.Helper()
	nc, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { nc.Close() })
	return &rawConn{t: t, nc: nc}
}

func (r *rawConn) write(b ...[]byte) {
	r.t.Helper()
	if _, err := r.nc.Write(bytes.Join(b, nil)); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

func (r *rawConn) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.nc, b); err != nil {
		r.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// greet reads the server's greeting and sends the client flags.
func (r *rawConn) greet(cflags uint32) {
	r.t.Helper()
	g := r.read(18)
	if binary.BigEndian.Uint64(g) != magicInitPasswd || binary.BigEndian.Uint64(g[8:]) != magicIHaveOpt {
		r.t.Fatalf("bad greeting % x", g)
	}
	if hf := binary.BigEndian.Uint16(g[16:]); hf != flagFixedNewstyle|flagNoZeroes {
		r.t.Fatalf("handshake flags %#x", hf)
	}
	r.write(be32(cflags))
}

func (r *rawConn) sendOpt(opt uint32, data []byte) {
	r.t.Helper()
	r.write(be64(magicIHaveOpt), be32(opt), be32(uint32(len(data))), data)
}

// optReply reads one option reply: its type and data.
func (r *rawConn) optReply(opt uint32) (uint32, []byte) {
	r.t.Helper()
	h := r.read(optReplyHeaderLen)
	if binary.BigEndian.Uint64(h) != magicOptReply || binary.BigEndian.Uint32(h[8:]) != opt {
		r.t.Fatalf("bad option reply header % x", h)
	}
	return binary.BigEndian.Uint32(h[12:]), r.read(int(binary.BigEndian.Uint32(h[16:])))
}

func goData(name string, infos ...uint16) []byte {
	d := append(be32(uint32(len(name))), name...)
	d = append(d, be16(uint16(len(infos)))...)
	for _, i := range infos {
		d = append(d, be16(i)...)
	}
	return d
}

// open negotiates (structured replies if asked) and enters transmission with GO; it
// returns the transmission flags.
func (r *rawConn) open(name string, structured bool) uint16 {
	r.t.Helper()
	r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	if structured {
		r.sendOpt(optStructuredReply, nil)
		if typ, _ := r.optReply(optStructuredReply); typ != repAck {
			r.t.Fatalf("structured reply refused: %#x", typ)
		}
	}
	r.sendOpt(optGo, goData(name, infoBlockSize))
	var flags uint16
	for {
		typ, data := r.optReply(optGo)
		switch typ {
		case repInfo:
			if binary.BigEndian.Uint16(data) == infoExport {
				flags = binary.BigEndian.Uint16(data[10:])
			}
			continue
		case repAck:
			return flags
		default:
			r.t.Fatalf("GO answered %#x %q", typ, data)
		}
	}
}

func (r *rawConn) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	r.t.Helper()
	var h [requestHeaderLen]byte
	(&request{flags: flags, typ: typ, cookie: cookie, offset: off, length: length}).encode(h[:])
	r.write(h[:], payload)
}

// simpleReply reads a simple reply header: its error and cookie.
func (r *rawConn) simpleReply() (uint32, uint64) {
	r.t.Helper()
	h := r.read(simpleReplyLen)
	if binary.BigEndian.Uint32(h) != magicSimpleReply {
		r.t.Fatalf("not a simple reply: % x", h)
	}
	return binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
}

type chunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

func (r *rawConn) chunk() chunk {
	r.t.Helper()
	h := r.read(structuredHeaderLen)
	if binary.BigEndian.Uint32(h) != magicStructuredRepl {
		r.t.Fatalf("not a structured reply: % x", h)
	}
	return chunk{
		flags: binary.BigEndian.Uint16(h[4:]), typ: binary.BigEndian.Uint16(h[6:]),
		cookie: binary.BigEndian.Uint64(h[8:]), payload: r.read(int(binary.BigEndian.Uint32(h[16:]))),
	}
}

// expectClosed checks that the server closed the connection.
func (r *rawConn) expectClosed() {
	r.t.Helper()
	_ = r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 1)
	n, err := r.nc.Read(b)
	if err == nil || n != 0 {
		r.t.Fatalf("connection still open (read %d bytes, %v)", n, err)
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		r.t.Fatal("server did not close the connection")
	}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed ^ byte(i>>9)
	}
	return b
}

func hasLine(out, want string) bool {
	for _, l := range strings.Split(out, "\n") {
		if strings.TrimSpace(l) == want {
			return true
		}
	}
	return false
}
