package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/blockdev/blockdevtest"
	"github.com/atrest/atrest/internal/testutil"
)

// TestClientConformance runs the blockdev conformance suite on the client against
// atrest's server, over a Faulty device so that Reopen can cut the power.
func TestClientConformance(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, ServerConfig{})
	var n atomic.Int32
	dial := func(t *testing.T, name string) blockdev.Device {
		c, err := Dial(context.Background(), ts.uri(name), ClientOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	blockdevtest.Run(t, blockdevtest.Config{
		NewReopenable: func(t *testing.T, size int64) (blockdev.Device, blockdevtest.Reopen) {
			name := fmt.Sprintf("e%d", n.Add(1))
			f := blockdev.NewFaulty(blockdev.NewMem(size))
			if err := ts.AddExport(Export{Name: name, Device: f}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ts.RemoveExport(context.Background(), name) })
			dev := dial(t, name)
			return dev, func(t *testing.T) blockdev.Device {
				dev.Close()
				if err := f.PowerCut(); err != nil {
					t.Fatal(err)
				}
				dev = dial(t, name)
				return dev
			}
		},
		TrimZeroes: true,
	})
}

// waitFile waits for a file that a peer writes once it is ready (a pid file).
func waitFile(t *testing.T, p string, exited <-chan struct{}) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if fi, err := os.Stat(p); err == nil && fi.Size() > 0 {
			return
		}
		select {
		case <-exited:
			t.Fatalf("the server exited before writing %s", p)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear", p)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// startPeer runs an NBD server program that writes a pid file when it is ready.
func startPeer(t *testing.T, pidfile string, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	waitFile(t, pidfile, exited)
}

// TestClientAgainstNbdkit runs the conformance suite against nbdkit's memory plugin and,
// with Reopen, its file plugin.
func TestClientAgainstNbdkit(t *testing.T) {
	nbdkit := testutil.Tool(t, "nbdkit")
	t.Run("memory", func(t *testing.T) {
		blockdevtest.Run(t, blockdevtest.Config{
			New: func(t *testing.T, size int64) blockdev.Device {
				dir := shortDir(t)
				sock, pid := filepath.Join(dir, "s"), filepath.Join(dir, "pid")
				startPeer(t, pid, nbdkit, "-f", "-U", sock, "-P", pid, "memory", fmt.Sprintf("size=%d", size))
				c, err := Dial(context.Background(), "unix:"+sock, ClientOptions{})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				return c
			},
			TrimZeroes: true,
		})
	})
	t.Run("file", func(t *testing.T) {
		dial := func(t *testing.T, sock string) blockdev.Device {
			c, err := Dial(context.Background(), "unix:"+sock, ClientOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return c
		}
		blockdevtest.Run(t, blockdevtest.Config{
			NewReopenable: func(t *testing.T, size int64) (blockdev.Device, blockdevtest.Reopen) {
				dir := shortDir(t)
				img := filepath.Join(dir, "img")
				os.WriteFile(img, nil, 0o600)
				os.Truncate(img, size)
				sock, pid := filepath.Join(dir, "s"), filepath.Join(dir, "pid")
				startPeer(t, pid, nbdkit, "-f", "-U", sock, "-P", pid, "file", "file="+img)
				dev := dial(t, sock)
				return dev, func(t *testing.T) blockdev.Device {
					dev.Close()
					dev = dial(t, sock)
					return dev
				}
			},
			TrimZeroes: true,
		})
	})
}

// TestClientAgainstQemuNbd runs the conformance suite against qemu-nbd.
func TestClientAgainstQemuNbd(t *testing.T) {
	qemuNbd := testutil.Tool(t, "qemu-nbd")
	blockdevtest.Run(t, blockdevtest.Config{
		New: func(t *testing.T, size int64) blockdev.Device {
			dir := shortDir(t)
			img := filepath.Join(dir, "img")
			os.WriteFile(img, nil, 0o600)
			os.Truncate(img, size)
			sock, pid := filepath.Join(dir, "s"), filepath.Join(dir, "pid")
			startPeer(t, pid, qemuNbd, "--persistent", "--shared=8", "--discard=unmap", "-f", "raw",
				"--socket="+sock, "--pid-file="+pid, img)
			c, err := Dial(context.Background(), "unix:"+sock, ClientOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return c
		},
		TrimZeroes: true,
	})
}

// crashDev helps stand for a server process that dies: while crashed, Flush hangs
// and then fails without reaching the device, so that nothing the dying server does
// makes the cache durable; the test closes the connections, cuts the power under the
// device, and revives it for the next server.
type crashDev struct {
	blockdev.Device
	mu      sync.Mutex
	revived chan struct{} // non-nil while crashed
}

var errCrashed = errors.New("crashed")

func (d *crashDev) Flush() error {
	d.mu.Lock()
	ch := d.revived
	d.mu.Unlock()
	if ch != nil {
		<-ch
		return errCrashed
	}
	return d.Device.Flush()
}

// crash kills srv the way a crash would: its connections drop (the client notices),
// and the device loses its volatile cache. It returns once srv is gone.
func crash(t *testing.T, srv *Server, done <-chan error, dev *crashDev, f *blockdev.Faulty, c *Client) {
	t.Helper()
	dev.mu.Lock()
	dev.revived = make(chan struct{})
	dev.mu.Unlock()
	closed := make(chan struct{})
	go func() {
		srv.Close() // its final flush hangs until the revival, then fails
		close(closed)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		st := c.state
		c.mu.Unlock()
		if st != stateUp {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the client did not notice the crash")
		}
		time.Sleep(time.Millisecond)
	}
	if err := f.PowerCut(); err != nil {
		t.Fatal(err)
	}
	dev.mu.Lock()
	close(dev.revived)
	dev.revived = nil
	dev.mu.Unlock()
	<-closed
	<-done
}

// serveOn starts a server for dev on sock (replacing a dead one's socket).
func serveOn(t *testing.T, sock string, dev blockdev.Device) (*Server, chan error) {
	t.Helper()
	l, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(ServerConfig{Logger: discardLogger})
	if err := s.AddExport(Export{Device: dev}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background(), l) }()
	return s, done
}

// TestClientReconnect restarts the server under a running write/verify loop, once
// cleanly and once as a crash that loses the device's volatile cache: no error reaches
// the caller, and every write reads back, also those that the crash lost, because the
// client replays them.
func TestClientReconnect(t *testing.T) {
	for _, crashIt := range []bool{false, true} {
		t.Run(map[bool]string{false: "shutdown", true: "crash"}[crashIt], func(t *testing.T) {
			checkLeaks(t)
			const size = 8 << 20
			f := blockdev.NewFaulty(blockdev.NewMem(size))
			dev := &crashDev{Device: f}
			sock := filepath.Join(shortDir(t), "s")
			srv, done := serveOn(t, sock, dev)
			c, err := Dial(context.Background(), "unix:"+sock, ClientOptions{ReconnectTimeout: 20 * time.Second, Connections: 2})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()

			const workers = 4
			var progress atomic.Int64
			stop := make(chan struct{})
			errs := make(chan error, workers)
			models := make([][]byte, workers)
			var wg sync.WaitGroup
			for w := range workers {
				region := int64(size / workers)
				base := int64(w) * region
				models[w] = make([]byte, region)
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(w), 1))
					m := models[w]
					buf := make([]byte, 64<<10)
					for i := 0; ; i++ {
						select {
						case <-stop:
							errs <- nil
							return
						default:
						}
						n := 512 * (1 + rng.IntN(128))
						off := int64(rng.IntN(int(region)-n)) &^ 511
						p := buf[:n]
						for j := range p {
							p[j] = byte(rng.Uint32())
						}
						if _, err := c.WriteAt(p, base+off); err != nil {
							errs <- fmt.Errorf("write: %w", err)
							return
						}
						copy(m[off:], p)
						off = int64(rng.IntN(int(region)-n)) &^ 511
						if _, err := c.ReadAt(p, base+off); err != nil {
							errs <- fmt.Errorf("read: %w", err)
							return
						}
						if !bytes.Equal(p, m[off:off+int64(n)]) {
							errs <- fmt.Errorf("worker %d: data at %d differs", w, base+off)
							return
						}
						if i%50 == 49 {
							if err := c.Flush(); err != nil {
								errs <- fmt.Errorf("flush: %w", err)
								return
							}
						}
						progress.Add(1)
					}
				})
			}
			waitProgress := func(n int64) {
				deadline := time.Now().Add(30 * time.Second)
				for progress.Load() < n && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
			}
			waitProgress(300)
			if crashIt {
				crash(t, srv, done, dev, f, c)
			} else {
				if err := srv.Shutdown(context.Background()); err != nil {
					t.Fatal(err)
				}
				<-done
			}
			at := progress.Load()
			srv, done = serveOn(t, sock, dev)
			waitProgress(at + 300)
			close(stop)
			wg.Wait()
			for range workers {
				if err := <-errs; err != nil {
					t.Fatal(err)
				}
			}
			if err := c.Flush(); err != nil {
				t.Fatal(err)
			}
			// After a final flush and a power cut, the device holds every write.
			if err := f.PowerCut(); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, size/workers)
			for w := range workers {
				f.ReadAt(got, int64(w)*int64(len(got)))
				if !bytes.Equal(got, models[w]) {
					t.Fatalf("region %d differs after the final flush", w)
				}
			}
			if err := srv.Shutdown(context.Background()); err != nil {
				t.Fatal(err)
			}
			<-done
		})
	}
}

// TestClientWritesLost: without a replay log, a crash with unflushed writes makes the
// next Flush fail once with ErrWritesLost.
func TestClientWritesLost(t *testing.T) {
	checkLeaks(t)
	f := blockdev.NewFaulty(blockdev.NewMem(1 << 20))
	dev := &crashDev{Device: f}
	sock := filepath.Join(shortDir(t), "s")
	srv, done := serveOn(t, sock, dev)
	c, err := Dial(context.Background(), "unix:"+sock, ClientOptions{ReplayBytes: -1, ReconnectTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.WriteAt([]byte("unflushed"), 0); err != nil {
		t.Fatal(err)
	}
	crash(t, srv, done, dev, f, c)
	srv, done = serveOn(t, sock, dev)
	defer func() { srv.Shutdown(context.Background()); <-done }()
	if err := c.Flush(); !errors.Is(err, ErrWritesLost) {
		t.Fatalf("flush after the crash: %v, want ErrWritesLost", err)
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("second flush: %v", err)
	}
}

// TestClientGivesUp: with no server coming back, a request fails with ErrDisconnected
// once it has waited ReconnectTimeout, counted from when it began to wait (not from
// the drop: a read that started later waited less, which is how `atrest mount` read
// EIO after 58 s of a 60 s timeout); then the client has given up and later requests
// fail at once (a read(2) that the kernel sends as several requests one after the
// other fails after one timeout, not several); the reconnect goes on, and once the
// server is back requests succeed again.
func TestClientGivesUp(t *testing.T) {
	checkLeaks(t)
	const timeout = 2 * time.Second
	sock := filepath.Join(shortDir(t), "s")
	srv, done := serveOn(t, sock, blockdev.NewMem(1<<20))
	var log testutil.Log
	c, err := Dial(context.Background(), "unix:"+sock, ClientOptions{ReconnectTimeout: timeout, Logger: log.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	srv.Close()
	<-done
	// The reader goroutine notices the drop and starts the reconnect at once; the read
	// starts well after it.
	for !strings.Contains(log.String(), "connection to") {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(timeout / 2)
	start := time.Now()
	if _, err := c.ReadAt(make([]byte, 512), 0); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("read: %v, want ErrDisconnected", err)
	}
	if d := time.Since(start); d < timeout-100*time.Millisecond || d > timeout+10*time.Second {
		t.Fatalf("the read gave up after %v, want the %v it may wait", d, timeout)
	}
	if !strings.Contains(log.String(), "requests fail at once until it is back") {
		t.Errorf("the client did not log that it gave up:\n%s", log.String())
	}
	start = time.Now()
	if _, err := c.ReadAt(make([]byte, 512), 0); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("read after the client gave up: %v, want ErrDisconnected", err)
	}
	if d := time.Since(start); d > timeout/2 {
		t.Fatalf("a read after the client gave up waited %v, want a failure at once", d)
	}
	// The server comes back: the reconnect, which went on, finds it.
	srv, done = serveOn(t, sock, blockdev.NewMem(1<<20))
	defer func() { srv.Shutdown(context.Background()); <-done }()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		_, err := c.ReadAt(make([]byte, 512), 0)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("read 30 s after the server came back: %v", err)
		}
	}
	if !strings.Contains(log.String(), "reconnected") {
		t.Errorf("no reconnect logged:\n%s", log.String())
	}
}

// TestClientUnflushed: Unflushed counts the writes, trims and zeroings that no Flush
// covers yet, and their bytes; a Flush empties it.
func TestClientUnflushed(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, ServerConfig{}, Export{Device: blockdev.NewMem(1 << 20)})
	c, err := Dial(context.Background(), ts.addr, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n, b := c.Unflushed(); n != 0 || b != 0 {
		t.Fatalf("Unflushed of a new client: %d, %d", n, b)
	}
	if _, err := c.WriteAt(make([]byte, 8192), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(make([]byte, 512), 1<<19); err != nil {
		t.Fatal(err)
	}
	if err := c.Trim(4096, 4096); err != nil {
		t.Fatal(err)
	}
	if n, b := c.Unflushed(); n != 3 || b != 8192+512+4096 {
		t.Fatalf("Unflushed after 2 writes and a trim: %d requests, %d bytes; want 3, %d", n, b, 8192+512+4096)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if n, b := c.Unflushed(); n != 0 || b != 0 {
		t.Fatalf("Unflushed after Flush: %d, %d", n, b)
	}
}

// TestClientSplitsAndErrors: requests above the server's maximum are split; the
// server's errors arrive as RemoteError with the right sentinels.
func TestClientSplitsAndErrors(t *testing.T) {
	checkLeaks(t)
	mem := blockdev.NewMem(8 << 20)
	ts := startServer(t, ServerConfig{MaxRequestSize: 64 << 10, Logger: discardLogger},
		Export{Device: &failDev{Device: mem, failOff: 6 << 20}},
		Export{Name: "ro", Device: mem, ReadOnly: true},
		Export{Name: "plain", Device: plainDev{mem}})
	c, err := Dial(context.Background(), ts.addr, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Info().MaxPayload != 64<<10 {
		t.Fatalf("%+v", c.Info())
	}
	p := pattern(1<<20+123, 5)
	if _, err := c.WriteAt(p, 1000); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if _, err := c.ReadAt(got, 1000); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("split read: %v", err)
	}
	_, err = c.ReadAt(make([]byte, 4096), 6<<20)
	var rerr *RemoteError
	if !errors.As(err, &rerr) || rerr.Errno != errIO || rerr.Op != "read" {
		t.Fatalf("read of a failing sector: %v", err)
	}
	ro, err := Dial(context.Background(), ts.uri("ro"), ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatalf("write on read-only: %v (%+v)", err, ro.Info())
	}
	pl, err := Dial(context.Background(), ts.uri("plain"), ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pl.Close()
	if err := pl.WriteZeroes(0, 4096, blockdev.ZeroFast); !errors.Is(err, blockdev.ErrNotFast) {
		t.Fatalf("fast zero on a device without it: %v", err)
	}
	if err := pl.Trim(0, 4096); !errors.Is(err, blockdev.ErrNotSupported) {
		t.Fatalf("trim on an export whose device cannot trim: %v", err)
	}
	if _, err := Dial(context.Background(), ts.uri("nope"), ClientOptions{}); !errors.Is(err, ErrNoExport) || bytes.Count([]byte(err.Error()), []byte("no export named")) > 1 {
		t.Fatalf("dial of a missing export: %v (want ErrNoExport, the server's words once)", err)
	}
	if _, err := c.ReadAt(make([]byte, 10), 8<<20-5); err == nil {
		t.Fatal("read across the end: no io.EOF")
	}
	var _ net.Conn
}

// closingDev answers its first reads with ErrClosed, which the server sends as
// ESHUTDOWN.
type closingDev struct {
	blockdev.Device
	left atomic.Int32
}

func (d *closingDev) ReadAt(p []byte, off int64) (int, error) {
	if d.left.Add(-1) >= 0 {
		return 0, blockdev.ErrClosed
	}
	return d.Device.ReadAt(p, off)
}

// TestClientShutdownErrno: an ESHUTDOWN answer makes the client disconnect softly and
// send the request again on a new connection.
func TestClientShutdownErrno(t *testing.T) {
	checkLeaks(t)
	dev := &closingDev{Device: blockdev.NewMem(1 << 20)}
	dev.left.Store(2)
	ts := startServer(t, ServerConfig{}, Export{Device: dev})
	c, err := Dial(context.Background(), ts.addr, ClientOptions{Connections: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	before := ts.Stats().Accepted
	if _, err := c.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatalf("read: %v", err)
	}
	if n := ts.Stats().Accepted - before; n != 2 {
		t.Fatalf("%d new connections, want 2 (one per ESHUTDOWN)", n)
	}
}

// TestClientCloseWhileReconnecting: Close returns promptly while a reconnect waits for a
// server that does not come back, and the waiting call fails with ErrClosed.
func TestClientCloseWhileReconnecting(t *testing.T) {
	checkLeaks(t)
	sock := filepath.Join(shortDir(t), "s")
	srv, done := serveOn(t, sock, blockdev.NewMem(1<<20))
	c, err := Dial(context.Background(), "unix:"+sock, ClientOptions{ReconnectTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	srv.Close()
	<-done
	errc := make(chan error, 1)
	go func() {
		_, err := c.ReadAt(make([]byte, 512), 0)
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond) // let the read wait for the reconnect
	start := time.Now()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, blockdev.ErrClosed) {
		t.Fatalf("waiting read: %v, want ErrClosed", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Close took %v", d)
	}
	if err := c.Close(); !errors.Is(err, blockdev.ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
}

// TestClientNoReconnectKeepsOtherConns: without reconnects, a connection that drops
// fails only the requests in flight on it; those on the other connections are answered,
// and the client goes on with the connections it has left.
func TestClientNoReconnectKeepsOtherConns(t *testing.T) {
	checkLeaks(t)
	dev := &gateDev{Device: blockdev.NewMem(1 << 20), open: make(chan struct{})}
	ts := startServer(t, ServerConfig{}, Export{Device: dev})
	c, err := Dial(context.Background(), ts.addr, ClientOptions{Connections: 4, ReconnectTimeout: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n := c.Info().Connections; n != 4 {
		t.Fatalf("%d connections", n)
	}
	const calls = 8 // two per connection (round robin)
	errs := make(chan error, calls)
	for range calls {
		go func() {
			_, err := c.ReadAt(make([]byte, 4096), 0) // held by the device
			errs <- err
		}()
	}
	deadline := time.Now().Add(5 * time.Second)
	for dev.running.Load() < calls && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	c.mu.Lock()
	dropped := c.conns[0]
	c.mu.Unlock()
	dropped.nc.Close()
	for range 2 {
		if err := <-errs; !errors.Is(err, ErrDisconnected) {
			t.Fatalf("read on the dropped connection: %v, want ErrDisconnected", err)
		}
	}
	close(dev.open)
	for range calls - 2 {
		if err := <-errs; err != nil {
			t.Fatalf("read on another connection: %v", err)
		}
	}
	if n := c.Info().Connections; n != 3 {
		t.Fatalf("%d connections left, want 3", n)
	}
	if _, err := c.WriteAt([]byte("still here"), 4096); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
}

// TestClientFaults: the client over atrest's server over a Faulty device reports every
// error class of the device (across the wire: ESHUTDOWN for a device gone, EIO for a
// medium error or a timeout below the server), and its Caps follow the device's.
func TestClientFaults(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, ServerConfig{Logger: discardLogger})
	var n atomic.Int32
	blockdevtest.RunFaults(t, blockdevtest.FaultConfig{
		Wrap: func(t *testing.T, lower blockdev.Device) blockdev.Device {
			name := fmt.Sprintf("f%d", n.Add(1))
			if err := ts.AddExport(Export{Name: name, Device: lower}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				ts.RemoveExport(context.Background(), name)
				lower.Close()
			})
			// A short window: a device gone is reported after it.
			c, err := Dial(context.Background(), ts.uri(name), ClientOptions{ReconnectTimeout: 300 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return c
		},
		PassesTrim:   true,
		TimeoutBelow: blockdev.ErrMedium,
	})
}

// TestClientDeviceGoneAndBack: while the server's device is gone, a request is retried
// on new connections further and further apart (the server ends each with ESHUTDOWN),
// and succeeds as soon as the device is back; with the device gone for longer than the
// reconnect window, it fails with ErrGone.
func TestClientDeviceGoneAndBack(t *testing.T) {
	checkLeaks(t)
	f := blockdev.NewFaulty(blockdev.NewMem(1 << 20))
	ts := startServer(t, ServerConfig{}, Export{Device: f})
	c, err := Dial(context.Background(), ts.addr, ClientOptions{ReconnectTimeout: 2 * time.Second, Connections: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	f.Vanish()
	accepted := ts.Stats().Accepted
	start := time.Now()
	_, err = c.ReadAt(make([]byte, 512), 0)
	if !errors.Is(err, blockdev.ErrGone) || !errors.Is(err, ErrDisconnected) {
		t.Fatalf("read of a device gone for good: %v, want ErrGone and ErrDisconnected", err)
	}
	// Backoff from 10 ms, doubling, for 2 s: about 8 tries; without it, hundreds.
	if d, dials := time.Since(start), ts.Stats().Accepted-accepted; dials > 20 {
		t.Errorf("%d connections in %v for one request to a device gone", dials, d)
	}

	go func() {
		time.Sleep(300 * time.Millisecond)
		f.Reinsert()
	}()
	if _, err := c.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatalf("read while the device comes back within the window: %v", err)
	}
}

// switchableTrim is a Mem whose Trim capability the test switches.
type switchableTrim struct {
	*blockdev.Mem
	trim atomic.Bool
}

func (d *switchableTrim) Caps() blockdev.Caps {
	c := d.Mem.Caps()
	c.Trim = d.trim.Load()
	return c
}

// TestExportFlagsFollowCaps: the server asks the device's Caps at each handshake, and
// the client's Caps are what it advertised.
func TestExportFlagsFollowCaps(t *testing.T) {
	checkLeaks(t)
	dev := &switchableTrim{Mem: blockdev.NewMem(1 << 20)}
	ts := startServer(t, ServerConfig{}, Export{Device: dev}, Export{Name: "ro", Device: dev, ReadOnly: true})
	caps := func(uri string) blockdev.Caps {
		t.Helper()
		c, err := Dial(context.Background(), uri, ClientOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.Caps()
	}
	if c := caps(ts.addr); c.Trim || !c.Zeroes || !c.FastZero || !c.FUA || c.ReadOnly || c.BlockSize != 512 {
		t.Errorf("Caps over a device that does not trim: %+v", c)
	}
	dev.trim.Store(true)
	if c := caps(ts.addr); !c.Trim {
		t.Errorf("Caps once the device trims: %+v", c)
	}
	if c := caps(ts.uri("ro")); c != (blockdev.Caps{ReadOnly: true, BlockSize: 512}) {
		t.Errorf("Caps of a read-only export: %+v", c)
	}
}
