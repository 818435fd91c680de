package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/linelog"
)

// Tests of the writer rule and of the volume identity (writer.go, docs/nbd.md).

var (
	volA = VolumeID{0xa0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
	volB = VolumeID{0xb0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
)

// logLines collects a server's or client's log for the test to search.
type logLines struct {
	t  testing.TB
	mu sync.Mutex
	b  strings.Builder
}

func (l *logLines) logger() *slog.Logger {
	return slog.New(linelog.New(l, "", slog.LevelDebug))
}

func (l *logLines) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimSuffix(string(p), "\n"))
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logLines) has(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Contains(l.b.String(), s)
}

func dialOK(t testing.TB, addr string, o ClientOptions) *Client {
	t.Helper()
	c, err := Dial(context.Background(), addr, o)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// goReplies sends NBD_OPT_GO (or NBD_OPT_INFO) and reads the answer: the final reply
// type and message, the transmission flags, and the NBD_INFO_ATREST_VOLUME payload.
func (r *rawConn) goReplies(opt uint32, name string, infos ...uint16) (typ uint32, msg string, flags uint16, volume []byte) {
	r.t.Helper()
	r.sendOpt(opt, goData(name, infos...))
	for {
		typ, data := r.optReply(opt)
		if typ != repInfo {
			return typ, string(data), flags, volume
		}
		switch binary.BigEndian.Uint16(data) {
		case infoExport:
			flags = binary.BigEndian.Uint16(data[10:])
		case infoAtrestVolume:
			volume = data[2:]
		}
	}
}

// TestHandshakeAtrestClient: NBD_OPT_ATREST_CLIENT is acknowledged once per connection
// and refused with NBD_REP_ERR_INVALID when malformed; NBD_INFO_ATREST_VOLUME comes
// only when asked for, and only for an export with a volume identity.
func TestHandshakeAtrestClient(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, ServerConfig{},
		Export{Name: "vol", Device: blockdev.NewMem(1 << 20), VolumeID: volA},
		Export{Name: "plain", Device: blockdev.NewMem(1 << 20)})
	long := strings.Repeat("d", maxWriterDescription+1)
	for name, data := range map[string][]byte{
		"empty":              nil,
		"short":              atrestClientOpt(1, 0, "")[:atrestClientFixedLen-1],
		"description-long":   atrestClientOpt(1, 0, long),
		"zero-id":            atrestClientOpt(0, 0, "x"),
		"unknown-flag":       atrestClientOpt(1, 1<<2, "x"),
		"read-only-takeover": atrestClientOpt(1, atrestClientReadOnly|atrestClientTakeOver, "x"),
		"control-char":       atrestClientOpt(1, 0, "a\nb"),
		"not-utf8":           atrestClientOpt(1, 0, "a\xffb"),
	} {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		r.sendOpt(optAtrestClient, data)
		if typ, msg := r.optReply(optAtrestClient); typ != repErrInvalid {
			t.Errorf("%s: NBD_OPT_ATREST_CLIENT answered %#x %q, want NBD_REP_ERR_INVALID", name, typ, msg)
		}
		r.sendOpt(optAbort, nil)
		r.optReply(optAbort)
		r.nc.Close()
	}

	r := dialRaw(t, ts.sock)
	r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	r.sendOpt(optAtrestClient, atrestClientOpt(7, atrestClientReadOnly, strings.Repeat("é", maxWriterDescription/2)))
	if typ, msg := r.optReply(optAtrestClient); typ != repAck {
		t.Fatalf("NBD_OPT_ATREST_CLIENT answered %#x %q, want NBD_REP_ACK", typ, msg)
	}
	r.sendOpt(optAtrestClient, atrestClientOpt(7, 0, "again"))
	if typ, _ := r.optReply(optAtrestClient); typ != repErrInvalid {
		t.Errorf("a second NBD_OPT_ATREST_CLIENT answered %#x, want NBD_REP_ERR_INVALID", typ)
	}
	if typ, _, _, vol := r.goReplies(optInfo, "vol", infoBlockSize); typ != repAck || vol != nil {
		t.Errorf("NBD_OPT_INFO without the request: %#x, volume % x; want ACK and no volume", typ, vol)
	}
	if typ, _, _, vol := r.goReplies(optInfo, "plain", infoAtrestVolume); typ != repAck || vol != nil {
		t.Errorf("NBD_OPT_INFO of an export without identity: %#x, volume % x; want ACK and no volume", typ, vol)
	}
	typ, msg, flags, vol := r.goReplies(optGo, "vol", infoBlockSize, infoAtrestVolume)
	if typ != repAck || !bytes.Equal(vol, volA[:]) {
		t.Fatalf("NBD_OPT_GO: %#x %q, volume % x; want ACK and % x", typ, msg, vol, volA[:])
	}
	if flags&tflagReadOnly == 0 {
		t.Errorf("read-only intent: flags %#x without NBD_FLAG_READ_ONLY", flags)
	}
	r.request(cmdWrite, 0, 1, 0, 4, []byte("data"))
	if errno, _ := r.simpleReply(); errno != errPerm {
		t.Errorf("write with read-only intent answered %s, want EPERM", errnoName(errno))
	}
}

// TestWriterRule runs the tests of the writer rule in parallel (each waits for the
// grace of a refusal).
func TestWriterRule(t *testing.T) {
	checkLeaks(t)
	t.Run("AcrossExports", func(t *testing.T) { t.Parallel(); testWriterRuleAcrossExports(t) })
	t.Run("ProcessIdentity", func(t *testing.T) { t.Parallel(); testWriterRuleProcessIdentity(t) })
	t.Run("TakeOver", func(t *testing.T) { t.Parallel(); testWriterTakeOver(t) })
}

// testWriterRuleAcrossExports: one writer per volume, across its export names; a
// second atrest client is refused with a message that names the holder; another
// volume is not affected; a client with read-only intent reads; a client with no
// identity gets a read-only connection and the server logs why; the hold ends with the
// holder's last connection.
func testWriterRuleAcrossExports(t *testing.T) {
	log := &logLines{t: t}
	mem := blockdev.NewMem(1 << 20)
	ts := startServer(t, ServerConfig{Logger: log.logger()},
		Export{Name: "vol", Device: mem, VolumeID: volA},
		Export{Name: "", Device: mem, VolumeID: volA},
		Export{Name: "other", Device: blockdev.NewMem(1 << 20), VolumeID: volB})

	a := dialOK(t, ts.uri("vol"), ClientOptions{Description: "writer A"})
	if _, err := a.WriteAt([]byte("from A"), 0); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err := Dial(context.Background(), ts.addr, ClientOptions{Description: "writer B"})
	if !errors.Is(err, ErrVolumeBusy) || !strings.Contains(err.Error(), "writer A") || !strings.Contains(err.Error(), volA.String()) {
		t.Fatalf("a second writer under the default export: %v; want ErrVolumeBusy naming writer A and the volume", err)
	}
	if d := time.Since(start); d < holdGrace {
		t.Errorf("refused after %v, before the %v grace", d, holdGrace)
	}
	if o := dialOK(t, ts.uri("other"), ClientOptions{}); o.VolumeID() != volB {
		t.Errorf("other volume: identity %s", o.VolumeID())
	} else if _, err := o.WriteAt([]byte("x"), 0); err != nil {
		t.Errorf("write to another volume: %v", err)
	}

	ro := dialOK(t, ts.addr, ClientOptions{ReadOnly: true})
	got := make([]byte, 6)
	if _, err := ro.ReadAt(got, 0); err != nil || string(got) != "from A" {
		t.Errorf("read-only client reads %q, %v", got, err)
	}
	if _, err := ro.WriteAt([]byte("no"), 0); !errors.Is(err, blockdev.ErrReadOnly) || !ro.Info().ReadOnly {
		t.Errorf("read-only client's write: %v (read-only %v), want ErrReadOnly", err, ro.Info().ReadOnly)
	}

	raw := dialRaw(t, ts.sock)
	if flags := raw.open("vol", false); flags&tflagReadOnly == 0 {
		t.Fatalf("a client without identity while A writes: flags %#x without NBD_FLAG_READ_ONLY", flags)
	}
	raw.request(cmdWrite, 0, 1, 0, 2, []byte("zz"))
	if errno, _ := raw.simpleReply(); errno != errPerm {
		t.Errorf("its write answered %s, want EPERM", errnoName(errno))
	}
	if !log.has(fmt.Sprintf("pid %d", os.Getpid())) || !log.has("gets read-only access") {
		t.Error("the server did not log why the client got read-only access")
	}
	raw.nc.Close()

	// The hold ends with A's connections: B gets in, also while A is still closing.
	go a.Close()
	b := dialOK(t, ts.addr, ClientOptions{Description: "writer B"})
	if _, err := b.WriteAt([]byte("from B"), 0); err != nil {
		t.Fatalf("B's write once A left: %v", err)
	}
	if !log.has("writer A is no longer the writer") || !log.has("writer B is the writer") {
		t.Error("the server did not log the change of writer")
	}
	if _, err := mem.ReadAt(got, 0); err != nil || string(got) != "from B" {
		t.Errorf("device holds %q", got)
	}
}

// testWriterRuleProcessIdentity: on a unix socket, the connections of one process that
// presents no identity are one writer (multi-conn), across export names; an atrest
// client is refused meanwhile with a message naming the process; connections closed
// without a word release the volume.
func testWriterRuleProcessIdentity(t *testing.T) {
	mem := blockdev.NewMem(1 << 20)
	ts := startServer(t, ServerConfig{},
		Export{Name: "vol", Device: mem, VolumeID: volA}, Export{Name: "", Device: mem, VolumeID: volA})
	var raws []*rawConn
	for _, name := range []string{"vol", "", "vol"} {
		r := dialRaw(t, ts.sock)
		if flags := r.open(name, false); flags&tflagReadOnly != 0 {
			t.Fatalf("connection %d of one process to %q: read-only (%#x)", len(raws), name, flags)
		}
		r.request(cmdWrite, 0, 1, 0, 2, []byte("ok"))
		if errno, _ := r.simpleReply(); errno != 0 {
			t.Fatalf("write on connection %d: %s", len(raws), errnoName(errno))
		}
		raws = append(raws, r)
	}
	_, err := Dial(context.Background(), ts.uri("vol"), ClientOptions{})
	if want := fmt.Sprintf("pid %d (", os.Getpid()); !errors.Is(err, ErrVolumeBusy) || !strings.Contains(err.Error(), want) {
		t.Fatalf("atrest client while a process writes: %v; want ErrVolumeBusy naming %q", err, want)
	}
	for _, r := range raws {
		r.nc.Close() // no NBD_CMD_DISC: a process that died
	}
	c := dialOK(t, ts.uri("vol"), ClientOptions{})
	if _, err := c.WriteAt([]byte("mine"), 0); err != nil {
		t.Fatal(err)
	}
}

// writeGate blocks writes at gateOff until open is closed, and tells when one arrived.
type writeGate struct {
	blockdev.Device
	arrived chan struct{}
	open    chan struct{}
}

const gateOff = 64 << 10

func (g *writeGate) WriteAt(p []byte, off int64) (int, error) {
	if off == gateOff {
		g.arrived <- struct{}{}
		<-g.open
	}
	return g.Device.WriteAt(p, off)
}

// testWriterTakeOver: a client with TakeOver gets in while another writer holds the
// volume, but only once the old writer's request in flight has been answered (it never
// lands after the new writer's writes); the old writer's connections are ended, its
// reconnects refused, and all its requests fail with ErrTakenOver from then on.
func testWriterTakeOver(t *testing.T) {
	log := &logLines{t: t}
	mem := blockdev.NewMem(1 << 20)
	dev := &writeGate{Device: mem, arrived: make(chan struct{}, 1), open: make(chan struct{})}
	ts := startServer(t, ServerConfig{Logger: log.logger()}, Export{Name: "vol", Device: dev, VolumeID: volA})
	openGate := sync.OnceFunc(func() { close(dev.open) })
	defer openGate() // also when the test fails: the server's shutdown waits for the write

	alog := &logLines{t: t}
	// One connection: the reply to its write in flight comes before the end of the
	// stream. (With several, the client drops them all when one ends.)
	a := dialOK(t, ts.uri("vol"), ClientOptions{Description: "writer A", Connections: 1, ReconnectTimeout: 10 * time.Second, Logger: alog.logger()})
	inFlight := make(chan error, 1)
	go func() {
		_, err := a.WriteAt([]byte("A in flight"), gateOff)
		inFlight <- err
	}()
	<-dev.arrived

	type dialed struct {
		c   *Client
		err error
	}
	bch := make(chan dialed, 1)
	go func() {
		c, err := Dial(context.Background(), ts.uri("vol"), ClientOptions{Description: "writer B", TakeOver: true})
		bch <- dialed{c, err}
	}()
	select {
	case d := <-bch:
		t.Fatalf("the take-over returned (%v) while the old writer's write was still running", d.err)
	case <-time.After(300 * time.Millisecond):
	}
	openGate()
	d := <-bch
	if d.err != nil {
		t.Fatalf("take-over: %v", d.err)
	}
	b := d.c
	defer b.Close()
	if err := <-inFlight; err != nil {
		t.Errorf("the old writer's write in flight at the take-over: %v, want it answered", err)
	}
	got := make([]byte, 12)
	if _, err := mem.ReadAt(got, gateOff); err != nil || string(got[:11]) != "A in flight" {
		t.Fatalf("once the take-over returned, the device holds %q, want the old writer's write in flight", got)
	}
	if _, err := b.WriteAt([]byte("B after take"), gateOff); err != nil {
		t.Fatal(err)
	}
	if !log.has("writer B takes volume " + volA.String()) {
		t.Error("the server did not log the take-over")
	}

	_, err := a.WriteAt([]byte("A too late"), gateOff)
	if !errors.Is(err, ErrTakenOver) || !strings.Contains(err.Error(), "writer B") {
		t.Fatalf("the old writer's write after the take-over: %v, want ErrTakenOver naming writer B", err)
	}
	start := time.Now()
	if _, err := a.ReadAt(make([]byte, 8), 0); !errors.Is(err, ErrTakenOver) || time.Since(start) > 5*time.Second {
		t.Errorf("a later read of the old writer: %v after %v, want ErrTakenOver at once", err, time.Since(start))
	}
	if !alog.has("every request fails from now on") {
		t.Error("the old writer did not log that it failed for good")
	}
	if _, err := mem.ReadAt(got, gateOff); err != nil || string(got) != "B after take" {
		t.Errorf("the device holds %q, want the new writer's data", got)
	}
}

// serveExportOn serves e on a unix socket at sock until the test ends or the caller
// closes the server.
func serveExportOn(t *testing.T, sock string, e Export, log *slog.Logger) *Server {
	t.Helper()
	l, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}

	s := NewServer(ServerConfig{Logger: log})
	if err := s.AddExport(e); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background(), l) }()
	t.Cleanup(func() { s.Close(); <-done })
	return s
}

// TestClientPinsVolume: the daemon on the socket is replaced by one that serves an
// export of the same name and size; the client reconnects and, unless it finds the
// volume identity it pinned at Dial, fails every request for good with
// ErrVolumeChanged, without writing a byte (neither its replay log nor the new write)
// to the other device.
func TestClientPinsVolume(t *testing.T) {
	checkLeaks(t)
	for _, tc := range []struct {
		name          string
		first, second VolumeID
		changed       bool
	}{
		{"other-volume", volA, volB, true},
		{"none-then-one", VolumeID{}, volA, true},
		{"one-then-none", volA, VolumeID{}, true},
		{"same-volume", volA, volA, false},
		{"none-both", VolumeID{}, VolumeID{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const size = 1 << 20
			sock := filepath.Join(shortDir(t), "s")
			first := blockdev.NewMem(size)
			srv := serveExportOn(t, sock, Export{Name: "vol0", Device: first, VolumeID: tc.first}, nil)
			clog := &logLines{t: t}
			c := dialOK(t, "nbd+unix:///vol0?socket="+sock, ClientOptions{ReconnectTimeout: 10 * time.Second, Logger: clog.logger()})
			if c.VolumeID() != tc.first || c.Info().Volume != tc.first {
				t.Fatalf("pinned %s (info %s), want %s", c.VolumeID(), c.Info().Volume, tc.first)
			}
			// Unflushed: in the replay log, which a reconnect sends again first.
			if _, err := c.WriteAt(bytes.Repeat([]byte{'u'}, 4096), 0); err != nil {
				t.Fatal(err)
			}
			srv.Close()

			second := blockdev.NewMem(size)
			foreign := pattern(size, 3)
			second.WriteAt(foreign, 0)
			serveExportOn(t, sock, Export{Name: "vol0", Device: second, VolumeID: tc.second}, nil)

			_, err := c.WriteAt(bytes.Repeat([]byte{'n'}, 4096), 8192)
			if !tc.changed {
				if err != nil {
					t.Fatalf("write after a reconnect to the same volume: %v", err)
				}
				got := make([]byte, 1)
				if second.ReadAt(got, 0); got[0] != 'u' {
					t.Error("the replay log was not sent to the same volume")
				}
				return
			}
			if !errors.Is(err, ErrVolumeChanged) || !strings.Contains(err.Error(), tc.first.String()) || !strings.Contains(err.Error(), tc.second.String()) {
				t.Fatalf("write after a reconnect to another volume: %v; want ErrVolumeChanged naming %s and %s", err, tc.first, tc.second)
			}
			for name, op := range map[string]func() error{
				"read":  func() error { _, err := c.ReadAt(make([]byte, 512), 0); return err },
				"write": func() error { _, err := c.WriteAt([]byte("x"), 0); return err },
				"flush": c.Flush,
				"zero":  func() error { return c.WriteZeroes(0, 4096, 0) },
			} {
				if err := op(); !errors.Is(err, ErrVolumeChanged) {
					t.Errorf("%s later: %v, want ErrVolumeChanged", name, err)
				}
			}
			got := make([]byte, size)
			second.ReadAt(got, 0)
			if !bytes.Equal(got, foreign) {
				t.Error("the client wrote to the other volume's device")
			}
			if !clog.has("every request fails from now on") {
				t.Error("the client did not log the change of volume")
			}
			if c.VolumeID() != tc.first {
				t.Errorf("VolumeID after the change: %s, want the pinned %s", c.VolumeID(), tc.first)
			}
		})
	}
}

// TestClientReconnectRefused: after a restart of the server, another writer got the
// volume first; the client's reconnects are refused, so it writes nothing (its replay
// log included) and its requests fail with ErrDisconnected once ReconnectTimeout has
// passed, the refusal named.
func TestClientReconnectRefused(t *testing.T) {
	checkLeaks(t)
	dir := shortDir(t)
	sock, other := filepath.Join(dir, "s"), filepath.Join(dir, "other")
	mem := blockdev.NewMem(1 << 20)
	e := Export{Name: "vol", Device: mem, VolumeID: volA}
	srv1 := serveExportOn(t, sock, e, nil)
	const timeout = 10 * time.Second // several refusals after holdGrace each, with room for a loaded machine
	a := dialOK(t, "nbd+unix:///vol?socket="+sock, ClientOptions{Description: "writer A", ReconnectTimeout: timeout})
	if _, err := a.WriteAt(bytes.Repeat([]byte{'A'}, 4096), 0); err != nil { // unflushed: in the replay log
		t.Fatal(err)
	}
	srv1.Close()

	// The new server: writer B gets in through another socket before A can reconnect.
	srv2 := serveExportOn(t, other, e, nil)
	b := dialOK(t, "nbd+unix:///vol?socket="+other, ClientOptions{Description: "writer B"})
	if _, err := b.WriteAt(bytes.Repeat([]byte{'B'}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	l, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv2.Serve(context.Background(), l) }()
	defer func() { srv2.Close(); <-served }()

	start := time.Now()
	_, err = a.ReadAt(make([]byte, 512), 0)
	if !errors.Is(err, ErrDisconnected) || !errors.Is(err, ErrVolumeBusy) || !strings.Contains(err.Error(), "writer B") {
		t.Fatalf("read while B holds the volume: %v, want ErrDisconnected after ErrVolumeBusy naming writer B", err)
	}
	t.Logf("failed after %v", time.Since(start).Round(time.Millisecond))
	got := make([]byte, 4096)
	if mem.ReadAt(got, 0); !bytes.Equal(got, bytes.Repeat([]byte{'B'}, 4096)) {
		t.Errorf("the device holds %q..., want B's write: A's replay log landed", got[:8])
	}
}

// TestAddExportVolumeID: exports of one volume identity must serve the same device.
func TestAddExportVolumeID(t *testing.T) {
	s := NewServer(ServerConfig{})
	defer s.Close()
	mem := blockdev.NewMem(4096)
	if err := s.AddExport(Export{Name: "a", Device: mem, VolumeID: volA}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddExport(Export{Name: "", Device: mem, VolumeID: volA}); err != nil {
		t.Errorf("the same volume under a second name: %v", err)
	}
	if err := s.AddExport(Export{Name: "b", Device: blockdev.NewMem(4096), VolumeID: volA}); err == nil {
		t.Error("a second device under the same volume identity was accepted")
	}
}

func TestVolumeIDString(t *testing.T) {
	if got, want := volA.String(), "a0010203-0405-0607-0809-0a0b0c0d0e0f"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got := (VolumeID{}).String(); got != "none" {
		t.Errorf("zero String() = %q", got)
	}
}
