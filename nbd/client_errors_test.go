package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/testutil"
)

// Tests of the client against a fake server that speaks a correct fixed-newstyle
// handshake and then misbehaves: every malformed answer must end in an error (the
// handshake's, or the connection dropped), never in a panic or a hang.

// fakePeer is the server side of one connection of a fake server.
type fakePeer struct {
	t  testing.TB
	nc net.Conn
}

// fakeServer listens on a fresh unix socket and runs script on the first connection.
// After script it half-closes the connection (the client reads EOF after what script
// wrote, and its own writes still succeed) and waits for the client to close it. It
// returns the address to Dial.
func fakeServer(t testing.TB, script func(p *fakePeer)) string {
	t.Helper()
	return fakeServerN(t, script)
}

// fakeServerN is fakeServer that runs scripts[i] on the i-th connection, one after
// the other.
func fakeServerN(t testing.TB, scripts ...func(p *fakePeer)) string {
	t.Helper()
	sock := filepath.Join(shortDir(t), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for _, script := range scripts {
			nc, err := l.Accept()
			if err != nil {
				return // the test ended without dialing
			}
			runFakePeer(t, nc, script)
		}
	}()
	t.Cleanup(func() {
		l.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("fake server still running 10 s after the test")
		}
	})
	return "unix:" + sock
}

// runFakePeer runs script on nc, then half-closes it and waits for the client to close it.
func runFakePeer(t testing.TB, nc net.Conn, script func(p *fakePeer)) {
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	func() {
		defer func() {
			// fakePeer.read ends the script by panicking with errPeerRead.
			if r := recover(); r != nil && r != errPeerRead {
				panic(r)
			}
		}()
		script(&fakePeer{t: t, nc: nc})
	}()
	_ = nc.(*net.UnixConn).CloseWrite()
	_, _ = io.Copy(io.Discard, nc)
}

var errPeerRead = errors.New("fake server: read failed")

func (p *fakePeer) write(b ...[]byte) { _, _ = p.nc.Write(bytes.Join(b, nil)) }

// read reads n bytes; when the client went away it reports the error and ends the script.
func (p *fakePeer) read(n int) []byte {
	b := make([]byte, n)
	if _, err := io.ReadFull(p.nc, b); err != nil {
		p.t.Errorf("fake server: read %d bytes: %v", n, err)
		panic(errPeerRead)
	}
	return b
}

// greet sends the server's greeting (fixed newstyle, no zeroes) and reads the client's flags.
func (p *fakePeer) greet() {
	p.write(be64(magicInitPasswd), be64(magicIHaveOpt), be16(flagFixedNewstyle|flagNoZeroes))
	p.read(4)
}

// readOpt reads one option; it returns its type.
func (p *fakePeer) readOpt() uint32 {
	h := p.read(optionHeaderLen)
	if binary.BigEndian.Uint64(h) != magicIHaveOpt {
		p.t.Errorf("fake server: option without IHAVEOPT: % x", h)
	}
	p.read(int(binary.BigEndian.Uint32(h[12:])))
	return binary.BigEndian.Uint32(h[8:])
}

// expectOpt reads one option and checks its type.
func (p *fakePeer) expectOpt(want uint32) {
	if got := p.readOpt(); got != want {
		p.t.Errorf("fake server: option %d, want %d", got, want)
	}
}

func optRep(opt, typ uint32, data []byte) []byte {
	return bytes.Join([][]byte{be64(magicOptReply), be32(opt), be32(typ), be32(uint32(len(data))), data}, nil)
}

func infoExportData(size uint64, flags uint16) []byte {
	return bytes.Join([][]byte{be16(infoExport), be64(size), be16(flags)}, nil)
}

func infoBlockData(minB, pref, maxP uint32) []byte {
	return bytes.Join([][]byte{be16(infoBlockSize), be32(minB), be32(pref), be32(maxP)}, nil)
}

const (
	fakeSize  = 64 << 10
	fakeFlags = tflagHasFlags | tflagSendFlush
)

// goReply is a correct answer to NBD_OPT_GO with the export's size and flags.
func goReply(size uint64, flags uint16, block []byte) []byte {
	return bytes.Join([][]byte{
		optRep(optGo, repInfo, infoExportData(size, flags)),
		optRep(optGo, repInfo, block),
		optRep(optGo, repAck, nil),
	}, nil)
}

// handshake runs a correct negotiation: structured replies accepted if asked, then GO.
func (p *fakePeer) handshake(structured bool) {
	p.greet()
	p.expectOpt(optStructuredReply)
	if structured {
		p.write(optRep(optStructuredReply, repAck, nil))
	} else {
		p.write(optRep(optStructuredReply, repErrUnsup, nil))
	}
	p.noIdentity()
	p.expectOpt(optGo)
	p.write(goReply(fakeSize, fakeFlags, infoBlockData(1, 4096, 1<<20)))
}

// noIdentity answers NBD_OPT_ATREST_CLIENT as servers other than atrest's do.
func (p *fakePeer) noIdentity() {
	p.expectOpt(optAtrestClient)
	p.write(optRep(optAtrestClient, repErrUnsup, nil))
}

// readReq reads one request (and a WRITE's payload).
func (p *fakePeer) readReq() request {
	var r request
	if !decodeRequest(p.read(requestHeaderLen), &r) {
		p.t.Error("fake server: request without its magic")
	}
	if r.typ == cmdWrite {
		p.read(int(r.length))
	}
	return r
}

func simpleRep(errno uint32, cookie uint64, payload []byte) []byte {
	h := make([]byte, simpleReplyLen)
	putSimpleReply(h, errno, cookie)
	return append(h, payload...)
}

// chunkRep is a structured reply chunk with the length of its payload.
func chunkRep(flags, typ uint16, cookie uint64, payload ...[]byte) []byte {
	p := bytes.Join(payload, nil)
	return chunkRepLen(flags, typ, cookie, uint32(len(p)), p)
}

// chunkRepLen is a chunk whose header claims length bytes, whatever follows.
func chunkRepLen(flags, typ uint16, cookie uint64, length uint32, payload []byte) []byte {
	h := make([]byte, structuredHeaderLen)
	putStructuredHeader(h, flags, typ, cookie, length)
	return append(h, payload...)
}

// within runs fn and fails the test if it does not return within d.
func within[T any](t testing.TB, d time.Duration, what string, fn func() T) T {
	t.Helper()
	ch := make(chan T, 1)
	go func() { ch <- fn() }()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		buf := make([]byte, 1<<20)
		t.Fatalf("%s still running after %v:\n%s", what, d, buf[:runtime.Stack(buf, true)])
		panic("unreachable")
	}
}

func TestClientErrHandshake(t *testing.T) {
	checkLeaks(t)
	good := infoBlockData(1, 4096, 1<<20)
	// Each script answers NBD_OPT_STRUCTURED_REPLY and, unless it fails first, NBD_OPT_GO.
	goWith := func(reply ...[]byte) func(p *fakePeer) {
		return func(p *fakePeer) {
			p.greet()
			p.expectOpt(optStructuredReply)
			p.write(optRep(optStructuredReply, repAck, nil))
			p.noIdentity()
			p.expectOpt(optGo)
			p.write(reply...)
		}
	}
	structuredWith := func(reply []byte) func(p *fakePeer) {
		return func(p *fakePeer) {
			p.greet()
			p.expectOpt(optStructuredReply)
			p.write(reply)
		}
	}
	cases := []struct {
		name   string
		script func(p *fakePeer)
		want   string
	}{
		{"GoWithoutInfoExport", goWith(optRep(optGo, repInfo, good), optRep(optGo, repAck, nil)),
			"NBD_OPT_GO succeeded without NBD_INFO_EXPORT"},
		{"ReplyBadMagic", structuredWith(bytes.Join([][]byte{be64(magicOptReply ^ 1), be32(optStructuredReply), be32(repAck), be32(0)}, nil)),
			"bad reply to option 8"},
		{"ReplyOtherOption", goWith(optRep(optStructuredReply, repAck, nil)), "bad reply to option 7"},
		{"ReplyTooLong", structuredWith(bytes.Join([][]byte{be64(magicOptReply), be32(optStructuredReply), be32(repAck), be32(1<<20 + 1)}, nil)),
			"option reply of 1048577 bytes"},
		{"ReplyServer", goWith(optRep(optGo, repServer, be32(0))), "unexpected reply 2 to option 7"},
		{"ReplyTruncated", goWith(optRep(optGo, repInfo, infoExportData(fakeSize, fakeFlags))[:25]), "EOF"},
		{"InfoShort", goWith(optRep(optGo, repInfo, []byte{0})), "short NBD_REP_INFO"},
		{"InfoExportLength", goWith(optRep(optGo, repInfo, infoExportData(fakeSize, fakeFlags)[:11])),
			"NBD_INFO_EXPORT of the wrong length"},
		{"InfoBlockLength", goWith(optRep(optGo, repInfo, good[:13])), "NBD_INFO_BLOCK_SIZE of the wrong length"},
		{"GoRefused", goWith(optRep(optGo, repErrPolicy, []byte("nope"))), "NBD_OPT_GO refused (reply 0x80000002): nope"},
		{"NoExport", goWith(optRep(optGo, repErrUnknown, []byte("gone"))), "no such export"},
		{"SizeOverflow", goWith(goReply(1<<63, fakeFlags, good)), "export size 9223372036854775808 does not fit in int64"},
		{"NoHasFlags", goWith(goReply(fakeSize, tflagSendFlush, good)), "transmission flags without NBD_FLAG_HAS_FLAGS"},
		{"MinBlockNotPow2", goWith(goReply(fakeSize, fakeFlags, infoBlockData(3, 4096, 1<<20))), "bad minimum block size 3"},
		{"MinBlockZero", goWith(goReply(fakeSize, fakeFlags, infoBlockData(0, 4096, 1<<20))), "bad minimum block size 0"},
		{"MinBlockTooBig", goWith(goReply(fakeSize, fakeFlags, infoBlockData(1<<17, 1<<17, 1<<20))), "bad minimum block size 131072"},
		{"PrefBlockNotPow2", goWith(goReply(fakeSize, fakeFlags, infoBlockData(512, 3000, 1<<20))), "bad preferred block size 3000"},
		{"PrefBelowMin", goWith(goReply(fakeSize, fakeFlags, infoBlockData(4096, 512, 1<<20))), "bad preferred block size 512"},
		{"MaxBelowPref", goWith(goReply(fakeSize, fakeFlags, infoBlockData(512, 4096, 1024))),
			"maximum payload 1024 below the preferred block size 4096"},
		{"NotNBD", func(p *fakePeer) { p.write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")) }, "not an NBD server"},
		{"Oldstyle", func(p *fakePeer) { p.write(be64(magicInitPasswd), be64(0x00420281861253)) }, "oldstyle"},
		{"ExportNameShort", func(p *fakePeer) {
			// An old server: GO unsupported, then NBD_OPT_EXPORT_NAME answered short.
			p.greet()
			p.expectOpt(optStructuredReply)
			p.write(optRep(optStructuredReply, repErrUnsup, nil))
			p.noIdentity()
			p.expectOpt(optGo)
			p.write(optRep(optGo, repErrUnsup, nil))
			p.expectOpt(optExportName)
			p.write(be64(fakeSize))
		}, "(no such export?)"},
		{"ExportNameNoHasFlags", func(p *fakePeer) {
			p.greet()
			p.expectOpt(optStructuredReply)
			p.write(optRep(optStructuredReply, repErrUnsup, nil))
			p.noIdentity()
			p.expectOpt(optGo)
			p.write(optRep(optGo, repErrUnsup, nil))
			p.expectOpt(optExportName)
			p.write(be64(fakeSize), be16(0))
		}, "transmission flags without NBD_FLAG_HAS_FLAGS"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			addr := fakeServer(t, tc.script)
			err := within(t, 5*time.Second, "Dial", func() error {
				c, err := Dial(context.Background(), addr, ClientOptions{DialTimeout: 3 * time.Second, ReconnectTimeout: -1})
				if err == nil {
					c.Close()
				}
				return err
			})
			if err == nil {
				t.Fatal("Dial succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "handshake with ") {
				t.Fatalf("Dial: %v, want a handshake error with %q", err, tc.want)
			}
			if tc.name == "NoExport" && !errors.Is(err, ErrNoExport) {
				t.Fatalf("Dial: %v, want ErrNoExport", err)
			}
		})
	}
}

// replyCase is a transmission-phase misbehaviour: the fake server answers the
// client's first request (a 4 KiB READ at reqOff, or a WRITE) with reply(cookie).
type replyCase struct {
	name       string
	structured bool
	write      bool
	reply      func(cookie uint64) []byte
	want       string // in the error the reader goroutine ends with
}

const reqOff, reqLen = 8192, 4096

func replyCases() []replyCase {
	data := func(off uint64, n int) []byte { return append(be64(off), pattern(n, 1)...) }
	hole := func(off uint64, n uint32) []byte { return append(be64(off), be32(n)...) }
	done := replyFlagDone
	return []replyCase{
		{"UnknownCookie", false, false, func(c uint64) []byte { return simpleRep(0, c+1, pattern(reqLen, 1)) },
			"reply for unknown cookie 2"},
		{"BadMagic", false, false, func(c uint64) []byte { return []byte("HTTP/1.1 200 OK\r\n\r\n") }, "bad reply magic"},
		{"SimpleHeaderShort", false, false, func(c uint64) []byte { return simpleRep(0, c, nil)[:10] }, "unexpected EOF"},
		{"SimplePayloadShort", false, false, func(c uint64) []byte { return simpleRep(0, c, pattern(100, 1)) }, "unexpected EOF"},
		{"ChunkUnknownCookie", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeNone, c+7) },
			"chunk for unknown cookie 8"},
		{"DataChunkTooShort", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeOffsetData, c, be64(reqOff)) },
			"bad content chunk (type 1, 8 bytes)"},
		{"HoleChunkLength", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeOffsetHole, c, hole(reqOff, reqLen), []byte{0}) },
			"bad content chunk (type 2, 13 bytes)"},
		{"DataChunkForWrite", true, true, func(c uint64) []byte { return chunkRep(done, replyTypeOffsetData, c, data(0, 16)) },
			"bad content chunk (type 1, 24 bytes)"},
		{"DataChunkBefore", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeOffsetData, c, data(reqOff-1, 16)) },
			"content chunk [8191, +16) outside the request [8192, +4096)"},
		{"DataChunkPast", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeOffsetData, c, data(reqOff+reqLen-8, 16)) },
			"content chunk [12280, +16) outside the request [8192, +4096)"},
		{"DataChunkFarPast", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeOffsetData, c, data(1<<63, 16)) },
			"outside the request"},
		{"HoleChunkTooLong", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeOffsetHole, c, hole(reqOff, reqLen+1)) },
			"content chunk [8192, +4097) outside the request [8192, +4096)"},
		{"ChunksOverlap", true, false, func(c uint64) []byte {
			return bytes.Join([][]byte{chunkRep(0, replyTypeOffsetHole, c, hole(reqOff, reqLen)),
				chunkRep(done, replyTypeOffsetData, c, data(reqOff+100, 16))}, nil)
		}, "content chunk [8292, +16) overlaps an earlier one of the same reply"},
		{"HoleChunkEmpty", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeOffsetHole, c, hole(reqOff, 0)) },
			"content chunk [8192, +0) outside the request"},
		{"NoneWithPayload", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeNone, c, be32(0)) },
			"bad NBD_REPLY_TYPE_NONE chunk"},
		{"NoneNotDone", true, false, func(c uint64) []byte { return chunkRep(0, replyTypeNone, c) },
			"bad NBD_REPLY_TYPE_NONE chunk"},
		{"ErrorChunkShort", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeError, c, be32(errIO), []byte{0}) },
			"error chunk of 5 bytes"},
		{"ErrorChunkLong", true, false, func(c uint64) []byte { return chunkRepLen(done, replyTypeError, c, 6+maxStringLen+65, nil) },
			"error chunk of 4167 bytes"},
		{"ErrorMessageLong", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeError, c, be32(errIO), be16(5), []byte("abc")) },
			"error chunk message longer than the chunk"},
		{"BlockStatusChunk", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeBlockStatus, c, be32(1), be32(reqLen), be32(0)) },
			"unexpected chunk type 5"},
		{"ChunkHeaderShort", true, false, func(c uint64) []byte { return chunkRep(done, replyTypeNone, c)[:12] }, "unexpected EOF"},
		{"DataChunkPayloadShort", true, false, func(c uint64) []byte {
			return chunkRepLen(done, replyTypeOffsetData, c, 8+reqLen, data(reqOff, 100))
		}, "unexpected EOF"},
		{"DataChunkOffsetShort", true, false, func(c uint64) []byte { return chunkRepLen(done, replyTypeOffsetData, c, 8+reqLen, be32(0)) },
			"unexpected EOF"},
		{"HoleChunkLengthShort", true, false, func(c uint64) []byte { return chunkRepLen(done, replyTypeOffsetHole, c, 12, be64(reqOff)) },
			"EOF"},
		{"ErrorChunkPayloadShort", true, false, func(c uint64) []byte { return chunkRepLen(done, replyTypeError, c, 20, be32(errIO)) },
			"unexpected EOF"},
		{"NoDoneChunk", true, false, func(c uint64) []byte { return chunkRep(0, replyTypeOffsetData, c, data(reqOff, reqLen)) }, "EOF"},
		{"Silence", false, false, func(c uint64) []byte { return nil }, "EOF"},
	}
}

// answer is the fake server's script for a replyCase.
func (rc replyCase) answer(t testing.TB) func(p *fakePeer) {
	return func(p *fakePeer) {
		p.handshake(rc.structured)
		r := p.readReq()
		if want := map[bool]uint16{false: cmdRead, true: cmdWrite}[rc.write]; r.typ != want || r.offset != reqOff || r.length != reqLen {
			t.Errorf("fake server: request %+v, want type %d at %d, %d bytes", r, want, reqOff, reqLen)
		}
		p.write(rc.reply(r.cookie))
	}
}

// TestClientErrReplies checks, for each misbehaviour, what the caller of ReadAt or
// WriteAt gets without reconnects: an ErrDisconnected error, the connection dropped
// (later calls fail at once), and a Close that returns.
func TestClientErrReplies(t *testing.T) {
	checkLeaks(t)
	for _, rc := range replyCases() {
		t.Run(rc.name, func(t *testing.T) {
			t.Parallel()
			var log testutil.Log
			opts := ClientOptions{DialTimeout: 3 * time.Second, ReconnectTimeout: -1, Logger: log.Logger()}
			c, err := Dial(context.Background(), fakeServer(t, rc.answer(t)), opts)
			if err != nil {
				t.Fatal(err)
			}
			if got := c.Info().StructuredReplies; got != rc.structured {
				t.Fatalf("structured replies %v, want %v", got, rc.structured)
			}
			buf := make([]byte, reqLen)
			err = within(t, 5*time.Second, "the request", func() error {
				if rc.write {
					_, err := c.WriteAt(buf, reqOff)
					return err
				}
				_, err := c.ReadAt(buf, reqOff)
				return err
			})
			if !errors.Is(err, ErrDisconnected) {
				t.Fatalf("request: %v, want ErrDisconnected", err)
			}
			err = within(t, 5*time.Second, "a second ReadAt", func() error { _, err := c.ReadAt(buf, 0); return err })
			if !errors.Is(err, ErrDisconnected) {
				t.Fatalf("ReadAt after the drop: %v, want ErrDisconnected", err)
			}
			if n := c.Info().Connections; n != 0 {
				t.Fatalf("%d connections left", n)
			}
			if err := within(t, 5*time.Second, "Close", c.Close); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if logs := log.String(); strings.Count(logs, "\n") != 1 || !strings.Contains(logs, "connection to the server lost") {
				t.Fatalf("log lines %q, want one about the lost connection", logs)
			}
		})
	}
}

// TestClientErrReplyReasons checks why the reader ends for each misbehaviour. The
// caller of ReadAt cannot see it reliably (the reader and the caller race to report
// the lost connection, and the caller's report says only "connection lost"), so this
// drives one connection directly: dialConn, the reader loop and roundTrip.
func TestClientErrReplyReasons(t *testing.T) {
	checkLeaks(t)
	for _, rc := range replyCases() {
		t.Run(rc.name, func(t *testing.T) {
			t.Parallel()
			a, err := ParseAddress(fakeServer(t, rc.answer(t)))
			if err != nil {
				t.Fatal(err)
			}
			c := &Client{addr: a, opts: ClientOptions{DialTimeout: 3 * time.Second, ReconnectTimeout: -1}.withDefaults()}
			cc, err := c.dialConn(context.Background(), false)
			if err != nil {
				t.Fatal(err)
			}
			ended := make(chan error, 1)
			go func() {
				err := cc.readReplies()
				cc.fail()
				ended <- err
			}()
			typ := cmdRead
			if rc.write {
				typ = cmdWrite
			}
			cl := newCall(typ, 0, reqOff, reqLen, make([]byte, reqLen))
			err = within(t, 5*time.Second, "roundTrip", func() error { return cc.roundTrip(cl) })
			if !errors.Is(err, errConnLost) {
				t.Fatalf("roundTrip: %v, want errConnLost", err)
			}
			reason := within(t, 5*time.Second, "the reader", func() error { return <-ended })
			if reason == nil || !strings.Contains(reason.Error(), rc.want) {
				t.Fatalf("reader ended with %v, want %q", reason, rc.want)
			}
		})
	}
}

// TestClientErrRemote checks the answers that fail one request but keep the
// connection: the next request is answered on it.
func TestClientErrRemote(t *testing.T) {
	checkLeaks(t)
	cases := []struct {
		name       string
		structured bool
		reply      func(cookie uint64) []byte
		want       string
	}{
		{"SimpleErrno", false, func(c uint64) []byte { return simpleRep(errNoSpc, c, nil) }, "ENOSPC to read at 8192 (4096 bytes)"},
		{"ErrorChunk", true, func(c uint64) []byte {
			return chunkRep(replyFlagDone, replyTypeError, c, be32(errIO), be16(4), []byte("disk"))
		}, "EIO to read at 8192 (4096 bytes): disk"},
		{"ErrorChunkErrnoZero", true, func(c uint64) []byte { return chunkRep(replyFlagDone, replyTypeError, c, be32(0), be16(0)) },
			"EINVAL to read"},
		{"ContentShort", true, func(c uint64) []byte {
			return bytes.Join([][]byte{
				chunkRep(0, replyTypeOffsetData, c, be64(reqOff), pattern(1024, 1)),
				chunkRep(replyFlagDone, replyTypeOffsetHole, c, be64(reqOff+2048), be32(1024)),
			}, nil)
		}, "EIO to read at 8192 (4096 bytes): server sent 2048 of 4096 bytes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			second := pattern(512, 9)
			addr := fakeServer(t, func(p *fakePeer) {
				p.handshake(tc.structured)
				r := p.readReq()
				p.write(tc.reply(r.cookie))
				r = p.readReq()
				p.write(simpleRep(0, r.cookie, second))
			})
			c, err := Dial(context.Background(), addr, ClientOptions{DialTimeout: 3 * time.Second, ReconnectTimeout: -1})
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := within(t, 5*time.Second, "Close", c.Close); err != nil {
					t.Errorf("Close: %v", err)
				}
			}()
			buf := make([]byte, reqLen)
			err = within(t, 5*time.Second, "ReadAt", func() error { _, err := c.ReadAt(buf, reqOff); return err })
			var rerr *RemoteError
			if !errors.As(err, &rerr) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ReadAt: %v, want a RemoteError with %q", err, tc.want)
			}
			err = within(t, 5*time.Second, "second ReadAt", func() error { _, err := c.ReadAt(buf[:512], 0); return err })
			if err != nil || !bytes.Equal(buf[:512], second) {
				t.Fatalf("second ReadAt on the same connection: %v", err)
			}
		})
	}
}

// TestClientErrOverlappingChunks: content chunks that overlap ("The server MUST NOT
// send content chunks that overlap with any earlier content or error chunk") and add
// up to the request's length leave part of the caller's buffer unwritten, and ReadAt
// must not report success then.
func TestClientErrOverlappingChunks(t *testing.T) {
	addr := fakeServer(t, func(p *fakePeer) {
		p.handshake(true)
		r := p.readReq()
		p.write(chunkRep(0, replyTypeOffsetData, r.cookie, be64(reqOff), pattern(2048, 1)),
			chunkRep(replyFlagDone, replyTypeOffsetData, r.cookie, be64(reqOff), pattern(2048, 1)))
	})
	c, err := Dial(context.Background(), addr, ClientOptions{DialTimeout: 3 * time.Second, ReconnectTimeout: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := bytes.Repeat([]byte{0xee}, reqLen)
	if _, err := c.ReadAt(buf, reqOff); err == nil {
		t.Fatalf("ReadAt succeeded; bytes 2048.. are still the caller's: % x...", buf[2048:2056])
	}
}

// TestClientRetriedReadAfterPartialReply: a READ whose connection drops after a first
// content chunk is sent again on the next connection, where the whole reply comes. The
// chunks of the lost attempt must not count against the new one: with them the
// client took the new reply for an overlap, dropped the connection and retried for
// ever (TestMountServeRestart met it when a daemon was killed mid-reply).
func TestClientRetriedReadAfterPartialReply(t *testing.T) {
	checkLeaks(t)
	want := pattern(reqLen, 9)
	addr := fakeServerN(t, func(p *fakePeer) {
		p.handshake(true)
		r := p.readReq()
		p.write(chunkRep(0, replyTypeOffsetData, r.cookie, be64(reqOff), want[:2048]))
		// and the connection ends, the reply unfinished
	}, func(p *fakePeer) {
		p.handshake(true)
		r := p.readReq()
		p.write(chunkRep(replyFlagDone, replyTypeOffsetData, r.cookie, be64(reqOff), want))
		p.readReq() // NBD_CMD_DISC
	})
	c, err := Dial(context.Background(), addr, ClientOptions{DialTimeout: 3 * time.Second, Connections: 1, ReconnectTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, reqLen)
	err = within(t, 10*time.Second, "ReadAt", func() error { _, err := c.ReadAt(buf, reqOff); return err })
	if err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("ReadAt retried on a new connection: %v (data equal %v)", err, bytes.Equal(buf, want))
	}
}

// replyModel says what a correct client makes of reply, everything a server sent in
// answer to a READ of reqLen bytes at reqOff with the given cookie: ok and the data
// read, or !ok when the read must fail. It follows the specification, accepting as
// the client does a simple reply or structured chunks whether or not structured
// replies were negotiated. Overlapping content chunks make it !ok.
func replyModel(reply []byte, cookie uint64) (data []byte, ok bool) {
	data = make([]byte, reqLen)
	covered := make([]bool, reqLen)
	got := 0
	failed := false // an error chunk came: the read fails once the reply is done
	for {
		if len(reply) < 4 {
			return nil, false
		}
		switch binary.BigEndian.Uint32(reply) {
		case magicSimpleReply:
			if len(reply) < simpleReplyLen || binary.BigEndian.Uint64(reply[8:]) != cookie ||
				binary.BigEndian.Uint32(reply[4:]) != 0 || len(reply) < simpleReplyLen+reqLen {
				return nil, false
			}
			return reply[simpleReplyLen : simpleReplyLen+reqLen], true
		case magicStructuredRepl:
		default:
			return nil, false
		}
		if len(reply) < structuredHeaderLen {
			return nil, false
		}
		flags := binary.BigEndian.Uint16(reply[4:])
		typ := binary.BigEndian.Uint16(reply[6:])
		length := binary.BigEndian.Uint32(reply[16:])
		if binary.BigEndian.Uint64(reply[8:]) != cookie || uint64(len(reply)-structuredHeaderLen) < uint64(length) {
			return nil, false
		}
		p := reply[structuredHeaderLen : structuredHeaderLen+int(length)]
		reply = reply[structuredHeaderLen+int(length):]
		switch {
		case typ == replyTypeOffsetData || typ == replyTypeOffsetHole:
			if len(p) < 9 || typ == replyTypeOffsetHole && len(p) != 12 {
				return nil, false
			}
			off := binary.BigEndian.Uint64(p)
			n := uint64(len(p) - 8)
			if typ == replyTypeOffsetHole {
				n = uint64(binary.BigEndian.Uint32(p[8:]))
			}
			if n == 0 || off < reqOff || off-reqOff > reqLen || n > reqLen-(off-reqOff) {
				return nil, false
			}
			start := int(off - reqOff)
			for i := start; i < start+int(n); i++ {
				if covered[i] {
					return nil, false
				}
				covered[i] = true
			}
			if typ == replyTypeOffsetData {
				copy(data[start:], p[8:])
			} else {
				clear(data[start : start+int(n)])
			}
			got += int(n)
		case typ == replyTypeNone:
			if len(p) != 0 || flags&replyFlagDone == 0 {
				return nil, false
			}
		case typ&(1<<15) != 0:
			if len(p) < 6 || len(p) > 6+maxStringLen+64 || int(binary.BigEndian.Uint16(p[4:])) > len(p)-6 {
				return nil, false
			}
			failed = true
		default:
			return nil, false
		}
		if flags&replyFlagDone != 0 {
			return data, !failed && got == reqLen
		}
	}
}

// clientReplySeeds are fuzz inputs: a byte whose low bit asks for structured replies,
// then the server's answer to a READ of reqLen bytes at reqOff (cookie 1).
func clientReplySeeds() [][]byte {
	cat := func(p ...[]byte) []byte { return bytes.Join(p, nil) }
	return [][]byte{
		cat([]byte{0}, simpleRep(0, 1, pattern(reqLen, 3))),
		cat([]byte{0}, simpleRep(0, 1, pattern(reqLen, 3))[:700]),
		cat([]byte{0}, simpleRep(errIO, 1, nil)),
		cat([]byte{1}, be32(magicSimpleReply^0x100), be32(0), be64(1)),
		cat([]byte{1}, chunkRep(replyFlagDone, replyTypeOffsetData, 1, be64(reqOff), pattern(reqLen, 4))),
		cat([]byte{1}, chunkRep(0, replyTypeOffsetHole, 1, be64(reqOff+1024), be32(reqLen-1024)),
			chunkRep(0, replyTypeOffsetData, 1, be64(reqOff), pattern(1024, 5)), chunkRep(replyFlagDone, replyTypeNone, 1)),
		cat([]byte{1}, chunkRep(0, replyTypeError, 1, be32(errIO), be16(2), []byte("no")),
			chunkRep(replyFlagDone, replyTypeOffsetHole, 1, be64(reqOff), be32(reqLen))),
		cat([]byte{0}, chunkRep(replyFlagDone, replyTypeErrorOffset, 2, be32(errIO), be16(0), be64(reqOff))),
	}
}

// FuzzClientReplies answers the client's first READ with the fuzz input, after a
// correct handshake, and closes. The client must not panic or hang, and a read that
// succeeds must hold exactly what a valid reply put there.
func FuzzClientReplies(f *testing.F) {
	for _, s := range clientReplySeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		structured := len(in) > 0 && in[0]&1 != 0
		if len(in) > 0 {
			in = in[1:]
		}
		addr := fakeServer(t, func(p *fakePeer) {
			p.handshake(structured)
			r := p.readReq()
			if r.typ != cmdRead || r.cookie != 1 || r.offset != reqOff || r.length != reqLen {
				t.Errorf("fake server: request %+v", r)
			}
			p.write(in)
		})
		c, err := Dial(context.Background(), addr, ClientOptions{DialTimeout: 3 * time.Second, ReconnectTimeout: -1})
		if err != nil {
			t.Fatal(err)
		}
		buf := bytes.Repeat([]byte{0xee}, reqLen)
		type result struct {
			n   int
			err error
		}
		res := within(t, 5*time.Second, "ReadAt", func() result { n, err := c.ReadAt(buf, reqOff); return result{n, err} })
		if err := within(t, 5*time.Second, "Close", c.Close); err != nil {
			t.Fatalf("Close: %v", err)
		}
		want, ok := replyModel(in, 1)
		switch {
		case res.err != nil && (res.n != 0 || ok):
			t.Fatalf("ReadAt = %d, %v; the reply was a valid success", res.n, res.err)
		case res.err != nil:
		case !ok:
			t.Fatalf("ReadAt = %d, nil on a reply that must fail", res.n)
		case res.n != reqLen || !bytes.Equal(buf, want):
			t.Fatalf("ReadAt = %d, nil but the buffer is not the reply's data", res.n)
		}
	})
}
