package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/linelog"
	"github.com/atrest/atrest/internal/testutil"
)

// startHog opens a connection to export that pipelines READs of n bytes and never reads
// a reply, until the server drops it (its writes fail then) or stop closes it, which
// the end of the test does too.
func startHog(t *testing.T, ts *testServer, export string, n uint32) (stop func()) {
	t.Helper()
	r := dialRawNet(t, ts.network, ts.dialTo)
	r.open(export, false)
	_ = r.nc.SetDeadline(time.Time{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		const batch = 64
		var b [batch * requestHeaderLen]byte
		for i := uint64(0); ; i += batch {
			for j := range uint64(batch) {
				(&request{typ: cmdRead, cookie: i + j, length: n}).encode(b[j*requestHeaderLen:])
			}
			if _, err := r.nc.Write(b[:]); err != nil {
				return
			}
		}
	}()
	stop = func() { r.nc.Close(); <-done }
	t.Cleanup(stop)
	return stop
}

// dialClient connects atrest's client to an export of ts, one connection, no reconnects.
func dialClient(t *testing.T, ts *testServer, export string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// Read-only: the stuck clients that share the export are its writer (one per volume).
	c, err := Dial(ctx, ts.addr, ClientOptions{Export: export, Connections: 1, ReconnectTimeout: -1, ReplayBytes: -1, ReadOnly: true})
	if err != nil {
		t.Fatalf("dial export %q: %v", export, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// promptRead checks that c reads n bytes within limit (see testutil.Prompt); a read
// that never ends is ended by closing ts (Client.Close would wait for it).
func promptRead(t *testing.T, ts *testServer, c *Client, n int, limit time.Duration) {
	t.Helper()
	buf := make([]byte, n)
	testutil.Prompt(t, fmt.Sprintf("read of %d bytes", n), limit, func() { ts.Close() }, func() error {
		_, err := c.ReadAt(buf, 0)
		return err
	})
}

// countingLog is a ServerConfig.Logger's destination that passes lines on to the
// test's log and counts those that contain a string.
type countingLog struct {
	t     *testing.T
	match string
	n     atomic.Int32
}

func (l *countingLog) logger() *slog.Logger {
	return slog.New(linelog.New(l, "", slog.LevelDebug))
}

func (l *countingLog) Write(p []byte) (int, error) {
	line := strings.TrimSuffix(string(p), "\n")
	if strings.Contains(line, l.match) {
		l.n.Add(1)
	}
	l.t.Log(line)
	return len(p), nil
}

// hogKinds are the two ways for clients that never read to take all of the server's
// pool: 32 MiB reads hold its payload bytes, 128 KiB reads (each on a worker) its
// requests. The pools are smaller than the defaults, so that the tests hold hundreds of
// MiB less; the defaults are exercised end to end (e2e TestServeStuckClients).
var hogKinds = []struct {
	name string
	n    uint32
	cfg  ServerConfig
}{
	{"bytes", 32 << 20, ServerConfig{MaxConnBytes: 32 << 20, MaxTotalBytes: 128 << 20}},
	{"requests", 128 << 10, ServerConfig{MaxConnRequests: 64, MaxTotalRequests: 256}},
}

// waitBudgetFreed waits until ts has no connection left and no budget in use.
func waitBudgetFreed(t *testing.T, ts *testServer) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for st := ts.Stats(); st.Connections != 0 || st.Requests != 0 || st.Bytes != 0; st = ts.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("connections or budget left: %+v", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestStuckClientsDoNotStarve: eight clients pipeline READs and never read a reply,
// until they hold all of the server's shared pool, of payload bytes or of requests. A
// new client still gets its 4 KiB read answered within a second, on another export and
// on theirs (each connection has a reserve of its own), and its 1 MiB read too (the
// largest request of an `atrest mount`). Once they close, all they held comes back.
func TestStuckClientsDoNotStarve(t *testing.T) {
	for _, network := range []string{"unix", "tcp"} {
		for _, kind := range hogKinds {
			t.Run(network+"/"+kind.name, func(t *testing.T) {
				checkLeaks(t)
				cfg := kind.cfg
				cfg.WriteTimeout = 10 * time.Minute // not during the test: see TestStuckClientsDropped
				ts := startServerOn(t, network, cfg,
					Export{Name: "a", Device: blockdev.NewMem(32 << 20)}, Export{Name: "b", Device: blockdev.NewMem(1 << 20)})
				var stops []func()
				for range 8 {
					stops = append(stops, startHog(t, ts, "a", kind.n))
				}
				waitFor(t, "the stuck clients to fill the pool", func() bool {
					st := ts.Stats()
					return st.PoolBytes == ts.cfg.MaxTotalBytes || st.PoolRequests == int64(ts.cfg.MaxTotalRequests)
				})
				for _, export := range []string{"b", "a"} {
					c := dialClient(t, ts, export)
					promptRead(t, ts, c, 4<<10, time.Second)
					promptRead(t, ts, c, 1<<20, time.Second)
					c.Close()
				}
				for _, stop := range stops {
					stop()
				}
				waitBudgetFreed(t, ts)
			})
		}
	}
}

// TestStuckClientsDropped: clients that take none of their replies are dropped after
// the write timeout, also those that got their share of the pool only once the first
// were dropped, and everything they held comes back.
func TestStuckClientsDropped(t *testing.T) {
	for _, network := range []string{"unix", "tcp"} {
		t.Run(network, func(t *testing.T) {
			checkLeaks(t)
			log := &countingLog{t: t, match: "has taken no reply for 1s; disconnecting"}
			cfg := hogKinds[0].cfg
			cfg.WriteTimeout = time.Second
			cfg.Logger = log.logger()
			ts := startServerOn(t, network, cfg, Export{Device: blockdev.NewMem(32 << 20)})
			const hogs = 8
			for range hogs {
				startHog(t, ts, "", hogKinds[0].n)
			}
			waitBudgetFreed(t, ts)
			if n := log.n.Load(); n != hogs {
				t.Fatalf("%d stuck clients logged as dropped, want %d", n, hogs)
			}
		})
	}
}

// TestSlowReaderKept: a client that takes nothing for a second, then a 32 MiB reply
// slowly, 512 KiB every 100 ms, makes the server's write last longer than the write
// timeout (3 s), with progress all along after the pause: it must not be dropped, and
// gets its data intact.
func TestSlowReaderKept(t *testing.T) {
	checkLeaks(t)
	log := &countingLog{t: t, match: "has taken no reply for"}
	mem := blockdev.NewMem(32 << 20)
	want := pattern(32<<20, 3)
	mem.WriteAt(want, 0)
	ts := startServer(t, ServerConfig{WriteTimeout: 3 * time.Second, Logger: log.logger()}, Export{Device: mem})
	r := dialRaw(t, ts.sock)
	r.open("", false)
	_ = r.nc.SetDeadline(time.Now().Add(60 * time.Second))
	start := time.Now()
	r.request(cmdRead, 0, 1, 0, 32<<20, nil)
	if errno, cookie := r.simpleReply(); errno != 0 || cookie != 1 {
		t.Fatalf("errno %d cookie %d", errno, cookie)
	}
	time.Sleep(time.Second)
	got := make([]byte, 0, 32<<20)
	for len(got) < 32<<20 {
		time.Sleep(100 * time.Millisecond)
		got = append(got, r.read(512<<10)...)
	}
	t.Logf("32 MiB taken in %v", time.Since(start))
	if string(got) != string(want) {
		t.Fatal("data differs")
	}
	r.request(cmdRead, 0, 2, 0, 4096, nil)
	if errno, cookie := r.simpleReply(); errno != 0 || cookie != 2 {
		t.Fatalf("errno %d cookie %d", errno, cookie)
	}
	r.read(4096)
	if n := log.n.Load(); n != 0 {
		t.Fatalf("a slow reader was dropped")
	}
}

// isClosedByServer reports whether the server closed nc: it reads what the server sent
// (the greeting) until the end of the stream, or until wait passes.
func isClosedByServer(t *testing.T, nc net.Conn, wait time.Duration) bool {
	t.Helper()
	_ = nc.SetReadDeadline(time.Now().Add(wait))
	_, err := io.ReadAll(nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false
	}
	if err != nil {
		t.Fatalf("reading from the server: %v", err)
	}
	return true
}

// connectAndRead checks that a client connects to ts and reads 4 KiB within a second
// (see testutil.Prompt).
func connectAndRead(t *testing.T, ts *testServer) {
	t.Helper()
	testutil.Prompt(t, "connect and read 4 KiB", time.Second, func() { ts.Close() }, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := Dial(ctx, ts.addr, ClientOptions{Connections: 1, ReconnectTimeout: -1, ReplayBytes: -1})
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.ReadAt(make([]byte, 4096), 0)
		return err
	})
}

// TestIdleHandshakes: 256 connections that never say anything do not lock a client
// out: with 64 handshakes at most, each new connection closes the one silent the
// longest, and a client that completes its handshake gets in and reads within a second.
func TestIdleHandshakes(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, ServerConfig{Logger: discardLogger}, Export{Device: blockdev.NewMem(1 << 20)})
	var idle []net.Conn
	for range 256 {
		idle = append(idle, dialRaw(t, ts.sock).nc)
	}
	waitFor(t, "the server to accept them", func() bool { return ts.Stats().Accepted == 256 })
	if st := ts.Stats(); st.Handshakes != 64 {
		t.Fatalf("%d handshakes in progress, want 64", st.Handshakes)
	}
	connectAndRead(t, ts)
	// The oldest were closed to make room; the newest are still there.
	if !isClosedByServer(t, idle[0], 5*time.Second) {
		t.Fatal("the oldest idle connection is still open")
	}
	if isClosedByServer(t, idle[len(idle)-1], 100*time.Millisecond) {
		t.Fatal("the newest idle connection was closed")
	}
}

// TestHandshakesPerPeer: over TCP, one address has 8 handshakes at most; its new
// connections close its own silent ones, not those of other addresses, and a client
// from the same address still gets in.
func TestHandshakesPerPeer(t *testing.T) {
	checkLeaks(t)
	ts := startServerOn(t, "tcp", ServerConfig{Logger: discardLogger}, Export{Device: blockdev.NewMem(1 << 20)})
	dialFrom := func(ip string) net.Conn {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
		nc, err := d.Dial("tcp", ts.dialTo)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		return nc
	}
	var other, own []net.Conn
	for range 8 {
		other = append(other, dialFrom("127.0.0.2"))
	}
	for range 20 {
		own = append(own, dialFrom("127.0.0.1"))
	}
	waitFor(t, "the server to accept them", func() bool { return ts.Stats().Accepted == 28 })
	if st := ts.Stats(); st.Handshakes != 16 {
		t.Fatalf("%d handshakes in progress, want 16", st.Handshakes)
	}
	for i, nc := range own[:12] {
		if !isClosedByServer(t, nc, 5*time.Second) {
			t.Fatalf("idle connection %d of 127.0.0.1 still open", i)
		}
	}
	connectAndRead(t, ts)
	for i, nc := range other {
		if isClosedByServer(t, nc, 50*time.Millisecond) {
			t.Fatalf("idle connection %d of 127.0.0.2 was closed by those of 127.0.0.1", i)
		}
	}
	for i, nc := range own[13:] {
		if isClosedByServer(t, nc, 50*time.Millisecond) {
			t.Fatalf("idle connection %d of 127.0.0.1 was closed, want only the oldest", 13+i)
		}
	}
}
