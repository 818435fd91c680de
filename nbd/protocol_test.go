package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// plainDev hides the optional capabilities of a device.
type plainDev struct{ blockdev.Device }

// failDev answers reads and writes in [failOff, failOff+4096) with EIO.
type failDev struct {
	blockdev.Device
	failOff int64
}

func (d *failDev) hit(off int64, n int) bool { return off < d.failOff+4096 && off+int64(n) > d.failOff }

func (d *failDev) ReadAt(p []byte, off int64) (int, error) {
	if d.hit(off, len(p)) {
		return 0, fmt.Errorf("read at %d: %w", off, syscall.EIO)
	}
	return d.Device.ReadAt(p, off)
}

func (d *failDev) Trim(off, n int64) error { return blockdev.Trim(d.Device, off, n) }

func (d *failDev) WriteAt(p []byte, off int64) (int, error) {
	if d.hit(off, len(p)) {
		return 0, fmt.Errorf("write at %d: %w", off, syscall.EIO)
	}
	return d.Device.WriteAt(p, off)
}

// gateDev blocks reads at offset 0 until open is closed, and counts the requests that
// run at once.
type gateDev struct {
	blockdev.Device
	open          chan struct{}
	running, peak atomic.Int32
	flushes       atomic.Int32
}

func (d *gateDev) enter() func() {
	n := d.running.Add(1)
	for {
		p := d.peak.Load()
		if n <= p || d.peak.CompareAndSwap(p, n) {
			break
		}
	}
	return func() { d.running.Add(-1) }
}

func (d *gateDev) ReadAt(p []byte, off int64) (int, error) {
	defer d.enter()()
	if off == 0 {
		<-d.open
	}
	return d.Device.ReadAt(p, off)
}

func (d *gateDev) WriteAt(p []byte, off int64) (int, error) {
	defer d.enter()()
	if off == 0 {
		<-d.open
	}
	return d.Device.WriteAt(p, off)
}

func (d *gateDev) Flush() error { d.flushes.Add(1); return d.Device.Flush() }

func TestHandshakeOptions(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, ServerConfig{}, threeExports()...)
	r := dialRaw(t, ts.sock)
	r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)

	r.sendOpt(optList, []byte{1})
	if typ, _ := r.optReply(optList); typ != repErrInvalid {
		t.Errorf("LIST with data: %#x, want ERR_INVALID", typ)
	}
	r.sendOpt(optList, nil)
	var names []string
	for {
		typ, data := r.optReply(optList)
		if typ == repAck {
			break
		}
		if typ != repServer {
			t.Fatalf("LIST reply %#x", typ)
		}
		n := binary.BigEndian.Uint32(data)
		names = append(names, fmt.Sprintf("%s|%s", data[4:4+n], data[4+n:]))
	}
	if got := fmt.Sprint(names); got != "[|default export notrim| ro|read only]" {
		t.Errorf("LIST: %s", got)
	}

	for _, c := range []struct {
		opt  uint32
		data []byte
		want uint32
	}{
		{optInfo, goData("nope"), repErrUnknown},
		{optInfo, []byte{0, 0, 0, 9, 'a'}, repErrInvalid},              // shorter than 6
		{optInfo, append(goData(""), 0), repErrInvalid},                // count mismatch
		{optInfo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0}, repErrInvalid}, // name beyond data
		{optGo, goData("nope"), repErrUnknown},
		{optStartTLS, nil, repErrUnsup},
		{optSetMetaContext, nil, repErrUnsup},
		{optListMetaContext, nil, repErrUnsup},
		{optExtendedHeaders, nil, repErrUnsup},
		{99, []byte("whatever"), repErrUnsup},
		{optStructuredReply, []byte{1}, repErrInvalid},
		{optStructuredReply, nil, repAck},
		{optStructuredReply, nil, repErrInvalid}, // twice
	} {
		r.sendOpt(c.opt, c.data)
		if typ, msg := r.optReply(c.opt); typ != c.want {
			t.Errorf("option %d % x: reply %#x %q, want %#x", c.opt, c.data, typ, msg, c.want)
		}
	}

	// INFO with name and description requests, for the read-only export.
	r.sendOpt(optInfo, goData("ro", infoName, infoDescription, infoBlockSize, 77))
	got := map[uint16][]byte{}
	for {
		typ, data := r.optReply(optInfo)
		if typ == repAck {
			break
		}
		if typ != repInfo {
			t.Fatalf("INFO reply %#x", typ)
		}
		got[binary.BigEndian.Uint16(data)] = data[2:]
	}
	if e := got[infoExport]; len(e) != 10 || binary.BigEndian.Uint64(e) != 1<<20 ||
		binary.BigEndian.Uint16(e[8:]) != tflagHasFlags|tflagReadOnly|tflagSendFlush|tflagSendCache|tflagCanMultiConn|tflagSendDF {
		t.Errorf("INFO_EXPORT % x", e)
	}
	if b := got[infoBlockSize]; len(b) != 12 || binary.BigEndian.Uint32(b) != 1 || binary.BigEndian.Uint32(b[8:]) != 32<<20 {
		t.Errorf("INFO_BLOCK_SIZE % x", b)
	}
	if string(got[infoName]) != "ro" || string(got[infoDescription]) != "read only" {
		t.Errorf("INFO_NAME %q, INFO_DESCRIPTION %q", got[infoName], got[infoDescription])
	}

	r.sendOpt(optAbort, []byte("ignored"))
	if typ, _ := r.optReply(optAbort); typ != repAck {
		t.Errorf("ABORT: %#x", typ)
	}
	r.expectClosed()
}

func TestHandshakeHardDisconnects(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, ServerConfig{MaxOptions: 4, HandshakeTimeout: 300 * time.Millisecond}, threeExports()...)
	t.Run("unknown client flag", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(1 << 5)
		r.expectClosed()
	})
	t.Run("bad option magic", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle)
		r.write(be64(0x1234), be32(optList), be32(0))
		r.expectClosed()
	})
	t.Run("oversized option", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle)
		r.write(be64(magicIHaveOpt), be32(optGo), be32(1<<30))
		r.expectClosed()
	})
	t.Run("too many options", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle)
		for range 4 {
			r.sendOpt(99, nil)
			r.optReply(99)
		}
		_, _ = r.nc.Write(append(append(be64(magicIHaveOpt), be32(99)...), be32(0)...))
		r.expectClosed()
	})
	t.Run("unknown export by EXPORT_NAME", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optExportName, []byte("nope"))
		r.expectClosed()
	})
	t.Run("silent client", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.read(18)
		r.expectClosed() // the handshake timeout
	})
	t.Run("vanishing client", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.greet(clientFlagFixedNewstyle)
		r.write(be64(magicIHaveOpt), be32(optGo), be32(100), []byte("partial"))
		r.nc.Close()
	})
}

func TestExportNameOption(t *testing.T) {
	checkLeaks(t)
	mem := blockdev.NewMem(1 << 20)
	mem.WriteAt([]byte("hello"), 0)
	ts := startServer(t, ServerConfig{}, Export{Name: "x", Device: mem})
	for _, noZeroes := range []bool{true, false} {
		r := dialRaw(t, ts.sock)
		cf := clientFlagFixedNewstyle
		if noZeroes {
			cf |= clientFlagNoZeroes
		}
		r.greet(cf)
		r.sendOpt(optExportName, []byte("x"))
		b := r.read(10)
		if binary.BigEndian.Uint64(b) != 1<<20 || binary.BigEndian.Uint16(b[8:])&tflagHasFlags == 0 {
			t.Fatalf("EXPORT_NAME reply % x", b)
		}
		if !noZeroes && !bytes.Equal(r.read(124), make([]byte, 124)) {
			t.Fatal("124 bytes of zeroes expected")
		}
		r.request(cmdRead, 0, 7, 0, 5, nil)
		if errno, cookie := r.simpleReply(); errno != 0 || cookie != 7 {
			t.Fatalf("read: errno %d cookie %d", errno, cookie)
		}
		if got := r.read(5); string(got) != "hello" {
			t.Fatalf("read %q", got)
		}
		r.request(cmdDisc, 0, 8, 0, 0, nil)
		r.expectClosed()
	}
}

// TestRequestErrors covers every error answer of the transmission phase, with simple
// and structured replies; after each, the connection must still be in sync.
func TestRequestErrors(t *testing.T) {
	checkLeaks(t)
	const max = 1 << 20
	mem := blockdev.NewMem(8 << 20)
	ts := startServer(t, ServerConfig{MaxRequestSize: max, Logger: discardLogger},
		Export{Name: "", Device: &failDev{Device: mem, failOff: 1 << 20}},
		Export{Name: "ro", Device: mem, ReadOnly: true},
		Export{Name: "plain", Device: plainDev{mem}},
		Export{Name: "notrim", Device: plainDev{mem}}, // its Caps say no Trim
	)
	const size = 8 << 20
	type tc struct {
		name    string
		export  string
		typ     uint16
		flags   uint16
		off     uint64
		length  uint32
		payload bool // send length bytes of payload
		errno   uint32
		errnoSR uint32 // with structured replies, if different
	}
	cases := []tc{
		{name: "read past end", typ: cmdRead, off: size - 512, length: 1024, errno: errInval},
		{name: "read at huge offset", typ: cmdRead, off: 1 << 63, length: 1, errno: errInval},
		{name: "write past end", typ: cmdWrite, off: size - 512, length: 1024, payload: true, errno: errNoSpc},
		{name: "oversized read", typ: cmdRead, length: max + 1, errno: errInval, errnoSR: errOverflow},
		{name: "oversized write", typ: cmdWrite, length: 2 * max, payload: true, errno: errInval},
		{name: "unknown command", typ: 42, errno: errInval},
		{name: "block status", typ: cmdBlockStatus, length: 512, errno: errInval},
		{name: "unknown flag on read", typ: cmdRead, flags: 1 << 9, length: 512, errno: errInval},
		{name: "no-hole on read", typ: cmdRead, flags: cmdFlagNoHole, length: 512, errno: errInval},
		{name: "fast-zero on write", typ: cmdWrite, flags: cmdFlagFastZero, length: 512, payload: true, errno: errInval},
		{name: "flush with offset", typ: cmdFlush, off: 512, errno: errInval},
		{name: "flush with length", typ: cmdFlush, length: 512, errno: errInval},
		{name: "device read error", typ: cmdRead, off: 1 << 20, length: 4096, errno: errIO},
		{name: "device write error", typ: cmdWrite, off: 1<<20 + 100, length: 10, payload: true, errno: errIO},
		{name: "write to read-only", export: "ro", typ: cmdWrite, length: 512, payload: true, errno: errPerm},
		{name: "trim on read-only", export: "ro", typ: cmdTrim, length: 512, errno: errPerm},
		{name: "zeroes on read-only", export: "ro", typ: cmdWriteZeroes, length: 512, errno: errPerm},
		{name: "FUA on read-only", export: "ro", typ: cmdRead, flags: cmdFlagFUA, length: 512, errno: errInval},
		{name: "trim not allowed", export: "notrim", typ: cmdTrim, length: 512, errno: errInval},
		{name: "trim past end", typ: cmdTrim, off: size, length: 1, errno: errInval},
		{name: "zeroes past end", typ: cmdWriteZeroes, off: size - 1, length: 2, errno: errNoSpc},
		{name: "fast zero refused", export: "plain", typ: cmdWriteZeroes, flags: cmdFlagFastZero, length: 4096, errno: errNotSup},
		{name: "cache past end", typ: cmdCache, off: size, length: 1, errno: errInval},
		// Successes, for contrast.
		{name: "cache", typ: cmdCache, length: size},
		{name: "zeroes beyond max payload", typ: cmdWriteZeroes, off: 2 * max, length: 4 * max},
		{name: "zeroes without fast path", export: "plain", typ: cmdWriteZeroes, flags: cmdFlagNoHole, length: 4096},
		{name: "trim", typ: cmdTrim, flags: cmdFlagFUA, off: 4096, length: 4096},
		{name: "flush with FUA", typ: cmdFlush, flags: cmdFlagFUA},
		{name: "zero-length write", typ: cmdWrite, off: size, errno: 0},
	}
	for _, structured := range []bool{false, true} {
		conns := map[string]*rawConn{}
		conn := func(export string) *rawConn {
			if r, ok := conns[export]; ok {
				return r
			}
			r := dialRaw(t, ts.sock)
			r.open(export, structured)
			conns[export] = r
			return r
		}
		for i, c := range cases {
			t.Run(fmt.Sprintf("%s structured=%v", c.name, structured), func(t *testing.T) {
				r := conn(c.export)
				r.t = t
				var payload []byte
				if c.payload {
					payload = make([]byte, c.length)
				}
				cookie := uint64(1000 + i)
				r.request(c.typ, c.flags, cookie, c.off, c.length, payload)
				want := c.errno
				if structured && c.errnoSR != 0 {
					want = c.errnoSR
				}
				var errno uint32
				var gotCookie uint64
				if structured && (c.typ == cmdRead || want != 0) {
					ch := r.chunk()
					gotCookie = ch.cookie
					if ch.flags&replyFlagDone == 0 {
						t.Fatalf("chunk without DONE: %+v", ch)
					}
					switch {
					case ch.typ == replyTypeError:
						errno = binary.BigEndian.Uint32(ch.payload)
						if ml := binary.BigEndian.Uint16(ch.payload[4:]); int(ml) != len(ch.payload)-6 || ml == 0 {
							t.Errorf("error chunk message length %d of %d", ml, len(ch.payload))
						}
					case ch.typ == replyTypeOffsetData && want == 0:
					default:
						t.Fatalf("chunk type %d", ch.typ)
					}
				} else {
					errno, gotCookie = r.simpleReply()
					if errno == 0 && c.typ == cmdRead {
						r.read(int(c.length))
					}
				}
				if errno != want || gotCookie != cookie {
					t.Fatalf("errno %s cookie %d, want %s cookie %d", errnoName(errno), gotCookie, errnoName(want), cookie)
				}
				// Still in sync: a small read answers right.
				r.request(cmdRead, 0, 1, 0, 8, nil)
				if structured {
					if ch := r.chunk(); ch.typ != replyTypeOffsetData || len(ch.payload) != 16 || ch.cookie != 1 {
						t.Fatalf("follow-up read: %+v", ch)
					}
				} else if errno, cookie := r.simpleReply(); errno != 0 || cookie != 1 {
					t.Fatalf("follow-up read: errno %d cookie %d", errno, cookie)
				} else {
					r.read(8)
				}
			})
		}
	}
	t.Run("zero-length structured read", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.open("", true)
		r.request(cmdRead, 0, 5, 0, 0, nil)
		if ch := r.chunk(); ch.typ != replyTypeNone || ch.flags != replyFlagDone || len(ch.payload) != 0 {
			t.Fatalf("%+v", ch)
		}
	})
	t.Run("write too large to skip", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.open("", false)
		r.request(cmdWrite, 0, 5, 0, 100<<20, nil)
		r.expectClosed()
	})
	t.Run("bad request magic", func(t *testing.T) {
		r := dialRaw(t, ts.sock)
		r.open("", false)
		r.write(make([]byte, requestHeaderLen))
		r.expectClosed()
	})
}

// TestRepliesReordered pipelines a read that the device holds back and one that it
// does not: the second is answered first.
func TestRepliesReordered(t *testing.T) {
	checkLeaks(t)
	dev := &gateDev{Device: blockdev.NewMem(1 << 20), open: make(chan struct{})}
	ts := startServer(t, ServerConfig{}, Export{Device: dev})
	for _, structured := range []bool{false, true} {
		r := dialRaw(t, ts.sock)
		r.open("", structured)
		r.request(cmdRead, 0, 1, 0, 4096, nil)     // held back
		r.request(cmdRead, 0, 2, 8192, 4096, nil)  // free
		r.request(cmdRead, 0, 3, 16384, 4096, nil) // free
		seen := map[uint64]bool{}
		for len(seen) < 2 {
			var cookie uint64
			if structured {
				cookie = r.chunk().cookie
			} else {
				var errno uint32
				errno, cookie = r.simpleReply()
				if errno != 0 {
					t.Fatal(errno)
				}
				if cookie != 1 {
					r.read(4096)
				}
			}
			if cookie == 1 {
				t.Fatal("the held-back read was answered first")
			}
			seen[cookie] = true
		}
		dev.open <- struct{}{} // lets the held read through
		if structured {
			if ch := r.chunk(); ch.cookie != 1 || ch.typ != replyTypeOffsetData {
				t.Fatalf("chunk %+v", ch)
			}
			continue
		}
		if _, cookie := r.simpleReply(); cookie != 1 {
			t.Fatalf("cookie %d", cookie)
		}
		r.read(4096)
	}
}

// slowDev takes at least delay for every read, like a drive that seeks, and holds reads
// at offset 0 like gateDev.
type slowDev struct {
	gateDev
	delay atomic.Int64 // nanoseconds
}

func (d *slowDev) ReadAt(p []byte, off int64) (int, error) {
	defer d.enter()()
	time.Sleep(time.Duration(d.delay.Load()))
	if off == 0 {
		<-d.open
	}
	return d.Device.ReadAt(p, off)
}

// TestSlowDeviceConcurrent: small reads that the reader would run inline on a fast
// device run concurrently on workers once the device turns out slow (see inlineSlow),
// and a read that blocks for good does not hold up those behind it (the watchdog).
func TestSlowDeviceConcurrent(t *testing.T) {
	checkLeaks(t)
	dev := &slowDev{gateDev: gateDev{Device: blockdev.NewMem(1 << 20), open: make(chan struct{})}}
	dev.delay.Store(int64(4 * inlineSlow))
	ts := startServer(t, ServerConfig{}, Export{Device: dev})
	r := dialRaw(t, ts.sock)
	r.open("", false)
	const n = 64
	for i := range n {
		r.request(cmdRead, 0, uint64(i), 4096*uint64(1+i%16), 4096, nil)
	}
	for range n {
		if errno, _ := r.simpleReply(); errno != 0 {
			t.Fatal(errno)
		}
		r.read(4096)
	}
	if p := dev.peak.Load(); p < 2 {
		t.Fatalf("the reads of a slow device ran one at a time (peak %d)", p)
	}

	// A fresh connection runs inline again; its first read blocks until released.
	dev.delay.Store(0)
	r2 := dialRaw(t, ts.sock)
	r2.open("", false)
	r2.request(cmdRead, 0, 1, 0, 4096, nil) // held at offset 0
	for i := range 8 {
		r2.request(cmdWrite, 0, uint64(100+i), 8192, 4, []byte("abcd"))
	}
	for range 8 {
		if errno, cookie := r2.simpleReply(); errno != 0 || cookie == 1 {
			t.Fatalf("errno %d cookie %d", errno, cookie)
		}
	}
	close(dev.open)
	if errno, cookie := r2.simpleReply(); errno != 0 || cookie != 1 {
		t.Fatalf("errno %d cookie %d", errno, cookie)
	}
	r2.read(4096)
}

// TestWorkerBound checks that requests in flight on one connection are bounded.
func TestWorkerBound(t *testing.T) {
	checkLeaks(t)
	dev := &gateDev{Device: blockdev.NewMem(1 << 20), open: make(chan struct{})}
	ts := startServer(t, ServerConfig{MaxConnRequests: 3}, Export{Device: dev})
	r := dialRaw(t, ts.sock)
	r.open("", false)
	for i := range 10 {
		r.request(cmdRead, 0, uint64(i), 0, 512, nil) // all held at offset 0
	}
	deadline := time.Now().Add(5 * time.Second)
	for dev.running.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // would let a fourth one in, were it allowed
	if p := dev.peak.Load(); p != 3 {
		t.Fatalf("%d requests ran at once, want 3", p)
	}
	close(dev.open)
	for range 10 {
		r.simpleReply()
		r.read(512)
	}
}

// TestShutdownDrains: a request in flight when Shutdown starts is answered, the device
// is flushed, and a connection in its handshake is closed.
func TestShutdownDrains(t *testing.T) {
	checkLeaks(t)
	dev := &gateDev{Device: blockdev.NewMem(1 << 20), open: make(chan struct{})}
	sock := shortDir(t) + "/s"
	l, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(ServerConfig{})
	if err := s.AddExport(Export{Device: dev}); err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(context.Background(), l) }()
	r := dialRaw(t, sock)
	r.open("", false)
	r.request(cmdWrite, 0, 1, 0, 4, []byte("data"))
	deadline := time.Now().Add(5 * time.Second)
	for dev.running.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	hs := dialRaw(t, sock)
	hs.read(18)
	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown(context.Background()) }()
	hs.expectClosed()
	time.Sleep(20 * time.Millisecond)
	close(dev.open)
	if errno, cookie := r.simpleReply(); errno != 0 || cookie != 1 {
		t.Fatalf("in-flight write: errno %d cookie %d", errno, cookie)
	}
	r.expectClosed()
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatal(err)
	}
	if dev.flushes.Load() == 0 {
		t.Fatal("no flush at shutdown")
	}
	got := make([]byte, 4)
	dev.Device.ReadAt(got, 0)
	if string(got) != "data" {
		t.Fatalf("%q", got)
	}
}

// TestShutdownFlushesOnce: Shutdown flushes every device once, also one served by two
// exports.
func TestShutdownFlushesOnce(t *testing.T) {
	checkLeaks(t)
	shared := blockdev.NewFaulty(blockdev.NewMem(1 << 20))
	other := blockdev.NewFaulty(blockdev.NewMem(1 << 20))
	s := NewServer(ServerConfig{})
	for _, e := range []Export{{Name: "vol", Device: shared}, {Name: "", Device: shared}, {Name: "other", Device: other}} {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := shared.Stats().Flushes; n != 1 {
		t.Errorf("shared device flushed %d times, want 1", n)
	}
	if n := other.Stats().Flushes; n != 1 {
		t.Errorf("other device flushed %d times, want 1", n)
	}
}

// negSizeDev reports a negative size.
type negSizeDev struct{ blockdev.Device }

func (negSizeDev) Size() int64 { return -1 }

func TestAddExportRefuses(t *testing.T) {
	long := strings.Repeat("x", maxStringLen+1)
	mem := blockdev.NewMem(512)
	closed := NewServer(ServerConfig{})
	if err := closed.Close(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		s    *Server
		e    Export
		want string // in the error; "" for ErrServerClosed
	}{
		{"no device", NewServer(ServerConfig{}), Export{Name: "a"}, "no device"},
		{"long name", NewServer(ServerConfig{}), Export{Name: long, Device: mem}, "longer than 4096 bytes"},
		{"long description", NewServer(ServerConfig{}), Export{Name: "a", Description: long, Device: mem}, "longer than 4096 bytes"},
		{"negative size", NewServer(ServerConfig{}), Export{Name: "a", Device: negSizeDev{mem}}, "negative device size"},
		{"server closed", closed, Export{Name: "a", Device: mem}, ""},
	} {
		err := c.s.AddExport(c.e)
		switch {
		case err == nil:
			t.Errorf("%s: accepted", c.name)
		case c.want == "" && !errors.Is(err, ErrServerClosed):
			t.Errorf("%s: %v, want ErrServerClosed", c.name, err)
		case c.want != "" && !strings.Contains(err.Error(), c.want):
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
		if got := c.s.Exports(); len(got) != 0 {
			t.Errorf("%s: exports %q after a refusal", c.name, got)
		}
	}
	// At the limits.
	s := NewServer(ServerConfig{})
	atLimit := strings.Repeat("x", maxStringLen)
	if err := s.AddExport(Export{Name: atLimit, Description: atLimit, Device: mem}); err != nil {
		t.Fatal(err)
	}
}

// TestMaxConns: MaxConns bounds the connections in transmission, not those in their
// handshake: a third client's GO is refused while two are served, and succeeds once one
// of them has ended.
func TestMaxConns(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, ServerConfig{MaxConns: 2}, Export{Device: blockdev.NewMem(1 << 20)})
	first := dialRaw(t, ts.sock)
	first.open("", false)
	dialRaw(t, ts.sock).open("", false)
	third := dialRaw(t, ts.sock)
	third.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	goReply := func() uint32 {
		third.sendOpt(optGo, goData(""))
		for {
			if typ, _ := third.optReply(optGo); typ != repInfo {
				return typ
			}
		}
	}
	if typ := goReply(); typ != repErrShutdown {
		t.Fatalf("GO beyond MaxConns answered %#x, want NBD_REP_ERR_SHUTDOWN", typ)
	}
	if st := ts.Stats(); st.Connections != 3 || st.Handshakes != 1 || st.Accepted != 3 {
		t.Fatalf("stats %+v, want 3 connections, 1 in its handshake, 3 accepted", st)
	}
	first.nc.Close()
	waitFor(t, "the first connection to end", func() bool { return ts.Stats().Connections == 2 })
	if typ := goReply(); typ != repAck {
		t.Fatalf("GO after a connection ended answered %#x", typ)
	}
	third.request(cmdRead, 0, 1, 0, 512, nil)
	if errno, _ := third.simpleReply(); errno != 0 {
		t.Fatalf("read: errno %d", errno)
	}
}

func TestRemoveExport(t *testing.T) {
	checkLeaks(t)
	ts := startServer(t, ServerConfig{}, threeExports()...)
	r := dialRaw(t, ts.sock)
	r.open("ro", false)
	if err := ts.RemoveExport(context.Background(), "ro"); err != nil {
		t.Fatal(err)
	}
	r.expectClosed()
	if err := ts.RemoveExport(context.Background(), "ro"); err == nil {
		t.Fatal("removed twice")
	}
	r2 := dialRaw(t, ts.sock)
	r2.greet(clientFlagFixedNewstyle)
	r2.sendOpt(optGo, goData("ro"))
	if typ, _ := r2.optReply(optGo); typ != repErrUnknown {
		t.Fatalf("GO on a removed export: %#x", typ)
	}
	if err := ts.AddExport(Export{Name: "ro", Device: blockdev.NewMem(512)}); err != nil {
		t.Fatal(err)
	}
	if err := ts.AddExport(Export{Name: "ro", Device: blockdev.NewMem(512)}); err == nil {
		t.Fatal("duplicate export accepted")
	}
	if got := fmt.Sprint(ts.Exports()); got != "[ notrim ro]" {
		t.Fatal(got)
	}
}

// TestMultiConnFlush: writes answered on several connections, then one FLUSH on
// another connection; the flush reaches the device after all of them.
func TestMultiConnFlush(t *testing.T) {
	checkLeaks(t)
	type event struct {
		write bool
		off   int64
	}
	var mu sync.Mutex
	var log []event
	dev := &recDev{Device: blockdev.NewMem(1 << 20), rec: func(w bool, off int64) {
		mu.Lock()
		log = append(log, event{w, off})
		mu.Unlock()
	}}
	ts := startServer(t, ServerConfig{}, Export{Device: dev})
	var rs []*rawConn
	for i := range 4 {
		r := dialRaw(t, ts.sock)
		if f := r.open("", false); f&tflagCanMultiConn == 0 {
			t.Fatal("CAN_MULTI_CONN not advertised")
		}
		r.request(cmdWrite, 0, uint64(i), uint64(i)*4096, 4096, pattern(4096, byte(i)))
		rs = append(rs, r)
	}
	for _, r := range rs {
		if errno, _ := r.simpleReply(); errno != 0 {
			t.Fatal(errno)
		}
	}
	rs[0].request(cmdFlush, 0, 99, 0, 0, nil)
	if errno, cookie := rs[0].simpleReply(); errno != 0 || cookie != 99 {
		t.Fatal(errno)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(log) != 5 || log[4].write {
		t.Fatalf("device saw %v, want 4 writes then the flush", log)
	}
}

type recDev struct {
	blockdev.Device
	rec func(write bool, off int64)
}

func (d *recDev) WriteAt(p []byte, off int64) (int, error) {
	n, err := d.Device.WriteAt(p, off)
	d.rec(true, off)
	return n, err
}

func (d *recDev) Flush() error { d.rec(false, 0); return d.Device.Flush() }
