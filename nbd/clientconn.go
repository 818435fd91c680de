package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// exportInfo is what the handshake learned about the export.
type exportInfo struct {
	size       int64
	flags      uint16
	minBlock   uint32
	prefBlock  uint32
	maxPayload uint32 // what the client sends at most: the server's maximum, capped at 32 MiB
	structured bool
	volume     VolumeID // NBD_INFO_ATREST_VOLUME; zero: none
}

func (i exportInfo) has(f uint16) bool { return i.flags&f != 0 }

// errConnLost marks a request that did not get its answer because the connection
// ended; the client retries it on a new connection.
var errConnLost = errors.New("connection lost")

// clientConn is one connection of a Client in the transmission phase. Requests are
// written under wmu by the callers' goroutines; one reader goroutine matches the
// replies to them by cookie and reads READ payloads straight into the callers' buffers.
type clientConn struct {
	c     *Client
	nc    net.Conn
	br    *bufio.Reader
	epoch uint64
	info  exportInfo
	slots chan struct{} // bounds the requests in flight

	wmu  sync.Mutex
	hdr  []byte // request header scratch, under wmu
	iov  [2][]byte
	bufs net.Buffers // iov for writev, in the connection so that it needs no allocation

	mu      sync.Mutex
	pending map[uint64]*call // nil once the connection failed
	cookie  uint64
	done    chan struct{}
}

// call is one request and, once done received, its outcome.
type call struct {
	typ    uint16
	flags  uint16
	off    uint64
	length uint32
	buf    []byte // WRITE payload or READ destination (len == length)

	done chan struct{} // receives once the call is complete (buffered, reused by the pool)
	err  error
	got  uint64 // structured READ: bytes covered by content chunks
	// structured READ: the ranges (relative to off) content chunks covered, so that an
	// overlap, which would leave bytes unwritten while got adds up, is refused
	spans [][2]uint64
	rerr  *RemoteError
}

// dialConn connects and negotiates one connection ("Fixed newstyle negotiation").
func (c *Client) dialConn(ctx context.Context, takeOver bool) (*clientConn, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.DialTimeout)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, c.addr.Network, c.addr.Addr)
	if err != nil {
		return nil, err
	}
	setSocketBuffers(nc)
	if dl, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	cc := &clientConn{
		c: c, nc: nc, br: bufio.NewReaderSize(nc, 64<<10),
		slots: make(chan struct{}, c.opts.MaxInFlight), hdr: make([]byte, requestHeaderLen),
		pending: make(map[uint64]*call), done: make(chan struct{}),
	}
	info, err := cc.negotiate(c.addr.Export, takeOver)
	if err != nil {
		nc.Close()
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, ctx.Err())
		}
		return nil, fmt.Errorf("handshake with %s: %w", c.addr, err)
	}
	if !stop() {
		nc.Close()
		return nil, ctx.Err()
	}
	_ = nc.SetDeadline(time.Time{})
	if c.opts.ReadOnly {
		info.flags |= tflagReadOnly
	}
	cc.info = info
	return cc, nil
}

// atrestClientData is the data of NBD_OPT_ATREST_CLIENT for this client (docs/nbd.md).
func (c *Client) atrestClientData(takeOver bool) []byte {
	var flags uint32
	if c.opts.ReadOnly {
		flags |= atrestClientReadOnly
	} else if takeOver {
		flags |= atrestClientTakeOver
	}
	d := make([]byte, 0, atrestClientFixedLen+len(c.opts.Description))
	d = append(d, c.writerID[:]...)
	d = binary.BigEndian.AppendUint32(d, flags)
	return append(d, c.opts.Description...)
}

func (cc *clientConn) negotiate(name string, takeOver bool) (exportInfo, error) {
	var info exportInfo
	var b [18]byte
	if _, err := io.ReadFull(cc.br, b[:16]); err != nil {
		return info, err
	}
	if binary.BigEndian.Uint64(b[0:]) != magicInitPasswd {
		return info, errors.New("not an NBD server (no NBDMAGIC)")
	}
	if binary.BigEndian.Uint64(b[8:]) != magicIHaveOpt {
		return info, errors.New("server speaks the oldstyle handshake, which is not supported")
	}
	if _, err := io.ReadFull(cc.br, b[:2]); err != nil {
		return info, err
	}
	hflags := binary.BigEndian.Uint16(b[:2])
	fixed := hflags&flagFixedNewstyle != 0
	noZeroes := hflags&flagNoZeroes != 0
	var cflags uint32
	if fixed {
		cflags |= clientFlagFixedNewstyle
	}
	if noZeroes {
		cflags |= clientFlagNoZeroes
	}
	binary.BigEndian.PutUint32(b[:4], cflags)
	if _, err := cc.nc.Write(b[:4]); err != nil {
		return info, err
	}
	info.minBlock, info.prefBlock, info.maxPayload = 1, 4096, 32<<20
	if fixed {
		typ, _, err := cc.option(optStructuredReply, nil, nil)
		if err != nil {
			return info, err
		}
		info.structured = typ == repAck
		// The writer identity, for atrest's server; others answer NBD_REP_ERR_UNSUP and
		// the client goes on without.
		typ, msg, err := cc.option(optAtrestClient, cc.c.atrestClientData(takeOver), nil)
		if err != nil {
			return info, err
		}
		if typ == repErrPolicy {
			return info, fmt.Errorf("%w: %s", ErrTakenOver, msg)
		}
		presented := typ == repAck
		// NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE (we honour the constraints) and for
		// the volume identity, which the client pins.
		data := make([]byte, 0, 4+len(name)+6)
		data = binary.BigEndian.AppendUint32(data, uint32(len(name)))
		data = append(data, name...)
		data = binary.BigEndian.AppendUint16(data, 2)
		data = binary.BigEndian.AppendUint16(data, infoBlockSize)
		data = binary.BigEndian.AppendUint16(data, infoAtrestVolume)
		gotExport := false
		typ, msg, err = cc.option(optGo, data, func(p []byte) error {
			if len(p) < 2 {
				return errors.New("short NBD_REP_INFO")
			}
			switch binary.BigEndian.Uint16(p) {
			case infoExport:
				if len(p) != 12 {
					return errors.New("NBD_INFO_EXPORT of the wrong length")
				}
				info.size = int64(binary.BigEndian.Uint64(p[2:]))
				info.flags = binary.BigEndian.Uint16(p[10:])
				gotExport = true
			case infoBlockSize:
				if len(p) != 14 {
					return errors.New("NBD_INFO_BLOCK_SIZE of the wrong length")
				}
				info.minBlock = binary.BigEndian.Uint32(p[2:])
				info.prefBlock = binary.BigEndian.Uint32(p[6:])
				info.maxPayload = binary.BigEndian.Uint32(p[10:])
			case infoAtrestVolume:
				if len(p) != 2+len(info.volume) {
					return errors.New("NBD_INFO_ATREST_VOLUME of the wrong length")
				}
				copy(info.volume[:], p[2:])
				if info.volume.IsZero() {
					return errors.New("NBD_INFO_ATREST_VOLUME of zeros")
				}
			}
			return nil
		})
		switch {
		case err != nil:
			return info, err
		case typ == repAck:
			if !gotExport {
				return info, errors.New("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
			}
			return info, info.check()
		case typ == repErrUnknown:
			err := fmt.Errorf("export %q: %w", name, ErrNoExport)
			if msg != "" {
				// In brackets: atrest's server repeats the name, others may not.
				err = fmt.Errorf("%w (the server says: %s)", err, msg)
			}
			return info, err
		case typ == repErrPolicy && presented:
			return info, fmt.Errorf("export %q: %w: %s", name, ErrVolumeBusy, msg)
		case typ != repErrUnsup:
			return info, fmt.Errorf("NBD_OPT_GO refused (reply %#x): %s", typ, msg)
		}
		// An old server: fall back to NBD_OPT_EXPORT_NAME, without structured replies'
		// guarantees changing (the server said whether it accepted them).
	}
	if err := cc.writeOption(optExportName, []byte(name)); err != nil {
		return info, err
	}
	n := 10 + 124
	if noZeroes {
		n = 10
	}
	r := make([]byte, n)
	if _, err := io.ReadFull(cc.br, r); err != nil {
		return info, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %w (no such export?)", name, err)
	}
	info.size = int64(binary.BigEndian.Uint64(r))
	info.flags = binary.BigEndian.Uint16(r[8:])
	return info, info.check()
}

// check validates the server's numbers ("Size constraints") and caps the payload.
func (i *exportInfo) check() error {
	pow2 := func(v uint32) bool { return v != 0 && v&(v-1) == 0 }
	switch {
	case i.size < 0:
		return fmt.Errorf("export size %d does not fit in int64", uint64(i.size))
	case i.flags&tflagHasFlags == 0:
		return errors.New("transmission flags without NBD_FLAG_HAS_FLAGS")
	case !pow2(i.minBlock) || i.minBlock > 1<<16:
		return fmt.Errorf("bad minimum block size %d", i.minBlock)
	case !pow2(i.prefBlock) || i.prefBlock < i.minBlock:
		return fmt.Errorf("bad preferred block size %d", i.prefBlock)
	case i.maxPayload < i.prefBlock:
		return fmt.Errorf("maximum payload %d below the preferred block size %d", i.maxPayload, i.prefBlock)
	}
	i.maxPayload = min(i.maxPayload, 32<<20)
	i.maxPayload -= i.maxPayload % i.minBlock
	if !i.structured {
		i.flags &^= tflagSendDF
	}
	return nil
}

// writeOption sends the header of option opt and its data.
func (cc *clientConn) writeOption(opt uint32, data []byte) error {
	var oh [optionHeaderLen]byte
	binary.BigEndian.PutUint64(oh[0:], magicIHaveOpt)
	binary.BigEndian.PutUint32(oh[8:], opt)
	binary.BigEndian.PutUint32(oh[12:], uint32(len(data)))
	_, err := (&net.Buffers{oh[:], data}).WriteTo(cc.nc)
	return err
}

// option sends one option and reads its replies until the final one; onInfo receives
// the data of each NBD_REP_INFO. It returns the final reply type and, for an error
// reply, its message.
func (cc *clientConn) option(opt uint32, data []byte, onInfo func([]byte) error) (uint32, string, error) {
	if err := cc.writeOption(opt, data); err != nil {
		return 0, "", err
	}
	for {
		var rh [optReplyHeaderLen]byte
		if _, err := io.ReadFull(cc.br, rh[:]); err != nil {
			return 0, "", err
		}
		if binary.BigEndian.Uint64(rh[0:]) != magicOptReply || binary.BigEndian.Uint32(rh[8:]) != opt {
			return 0, "", fmt.Errorf("bad reply to option %d", opt)
		}
		typ := binary.BigEndian.Uint32(rh[12:])
		length := binary.BigEndian.Uint32(rh[16:])
		if length > 1<<20 {
			return 0, "", fmt.Errorf("option reply of %d bytes", length)
		}
		p := make([]byte, length)
		if _, err := io.ReadFull(cc.br, p); err != nil {
			return 0, "", err
		}
		switch {
		case typ == repInfo:
			if onInfo != nil {
				if err := onInfo(p); err != nil {
					return 0, "", err
				}
			}
		case typ == repAck || typ&(1<<31) != 0:
			return typ, string(p), nil
		default:
			// Other replies (NBD_REP_SERVER...) are not expected for what we send.
			return 0, "", fmt.Errorf("unexpected reply %d to option %d", typ, opt)
		}
	}
}

// start launches the reader goroutine.
func (cc *clientConn) start() {
	cc.c.bg.Add(1)
	go func() {
		defer cc.c.bg.Done()
		err := cc.readReplies()
		cc.fail()
		cc.c.connLost(cc, err)
	}()
}

// fail marks the connection broken (pending nil) and completes every pending call with
// errConnLost. Only the reader goroutine calls it, once it stopped touching the calls'
// buffers; other goroutines close nc, which ends the reader.
func (cc *clientConn) fail() {
	cc.mu.Lock()
	pending := cc.pending
	cc.pending = nil
	close(cc.done)
	cc.mu.Unlock()
	_ = cc.nc.Close()
	for _, cl := range pending {
		cl.err = errConnLost
		cl.done <- struct{}{}
	}
}

// disconnect sends NBD_CMD_DISC and closes the connection ("Terminating the
// transmission phase": a soft disconnect).
func (cc *clientConn) disconnect() {
	cc.wmu.Lock()
	r := request{typ: cmdDisc}
	r.encode(cc.hdr)
	_ = cc.nc.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = cc.nc.Write(cc.hdr)
	cc.wmu.Unlock()
	_ = cc.nc.Close()
}

// roundTrip sends cl and waits for its reply. It returns errConnLost (wrapped) when
// the connection ended first.
func (cc *clientConn) roundTrip(cl *call) error {
	select {
	case cc.slots <- struct{}{}:
	case <-cc.done:
		return errConnLost
	}
	defer func() { <-cc.slots }()
	if cl.done == nil {
		cl.done = make(chan struct{}, 1)
	}
	cl.err, cl.got, cl.rerr, cl.spans = nil, 0, nil, cl.spans[:0] // a retry starts afresh
	cc.mu.Lock()
	if cc.pending == nil { // failed
		cc.mu.Unlock()
		return errConnLost
	}
	cc.cookie++
	cookie := cc.cookie
	cc.pending[cookie] = cl
	cc.mu.Unlock()

	cc.wmu.Lock()
	r := request{flags: cl.flags, typ: cl.typ, cookie: cookie, offset: cl.off, length: cl.length}
	r.encode(cc.hdr)
	var err error
	if cl.typ == cmdWrite && len(cl.buf) > 0 {
		cc.iov = [2][]byte{cc.hdr, cl.buf}
		cc.bufs = cc.iov[:]
		_, err = cc.bufs.WriteTo(cc.nc)
		cc.iov[1] = nil
	} else {
		_, err = cc.nc.Write(cc.hdr)
	}
	cc.wmu.Unlock()
	if err != nil {
		cc.stopWriting()
	}
	<-cl.done
	return cl.err
}

var callPool = sync.Pool{New: func() any { return new(call) }}

// newCall returns a call from the pool; putCall gives it back once its round trip ended.
func newCall(typ, flags uint16, off uint64, length uint32, buf []byte) *call {
	cl := callPool.Get().(*call)
	*cl = call{typ: typ, flags: flags, off: off, length: length, buf: buf, done: cl.done, spans: cl.spans[:0]}
	return cl
}

func putCall(cl *call) {
	cl.buf, cl.rerr, cl.err = nil, nil, nil
	callPool.Put(cl)
}

// stopWriting ends a connection whose write failed. The server may have read, run and
// answered requests before it went away, and those replies may still be in the socket's
// receive buffer: the write side is shut and the reader left to collect them up to the
// end of the stream (bounded by drainReplies), after which it fails every call still
// pending, this one included. Closing at once would fail answered calls too.
func (cc *clientConn) stopWriting() {
	cw, ok := cc.nc.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		_ = cc.nc.Close()
		return
	}
	_ = cc.nc.SetReadDeadline(time.Now().Add(drainReplies))
}

// drainReplies bounds how long the reader waits for replies after a write failed.
const drainReplies = 5 * time.Second

// lookup returns, and with remove takes away, the pending call of a cookie.
func (cc *clientConn) lookup(cookie uint64, remove bool) *call {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	cl := cc.pending[cookie]
	if remove {
		delete(cc.pending, cookie)
	}
	return cl
}

func (cc *clientConn) complete(cl *call, rerr *RemoteError) {
	if rerr != nil {
		rerr.Op, rerr.Offset, rerr.Length = cmdName(cl.typ), int64(cl.off), int64(cl.length)
		rerr.fastZero = cl.typ == cmdWriteZeroes && cl.flags&cmdFlagFastZero != 0
		if rerr.Errno == errShutdown {
			// "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft
			// disconnect": the request is retried on a new connection.
			cl.err = errConnLost
			cl.done <- struct{}{}
			cc.c.bg.Add(1) // the reader, which calls this, is counted: Add is safe
			go func() {
				defer cc.c.bg.Done()
				cc.disconnect()
			}()
			return
		}
		cl.err = rerr
	}
	cl.done <- struct{}{} // the caller may reuse cl from now on
}

// readReplies is the reader loop ("Simple reply message", "Structured reply chunk
// message"); it returns the error that ended the connection.
func (cc *clientConn) readReplies() error {
	var h [structuredHeaderLen + 8]byte
	for {
		if _, err := io.ReadFull(cc.br, h[:4]); err != nil {
			return err
		}
		switch binary.BigEndian.Uint32(h[:4]) {
		case magicSimpleReply:
			if _, err := io.ReadFull(cc.br, h[4:simpleReplyLen]); err != nil {
				return err
			}
			errno := binary.BigEndian.Uint32(h[4:])
			cookie := binary.BigEndian.Uint64(h[8:])
			cl := cc.lookup(cookie, true)
			if cl == nil {
				return fmt.Errorf("reply for unknown cookie %d", cookie)
			}
			if errno != 0 {
				cc.complete(cl, &RemoteError{Errno: errno})
				continue
			}
			if cl.typ == cmdRead {
				if _, err := io.ReadFull(cc.br, cl.buf); err != nil {
					cc.mu.Lock()
					cc.pending[cookie] = cl // failed with the others by fail
					cc.mu.Unlock()
					return err
				}
			}
			cc.complete(cl, nil)
		case magicStructuredRepl:
			if err := cc.readChunk(h[:]); err != nil {
				return err
			}
		default:
			return errors.New("bad reply magic")
		}
	}
}

func (cc *clientConn) readChunk(h []byte) error {
	if _, err := io.ReadFull(cc.br, h[4:structuredHeaderLen]); err != nil {
		return err
	}
	flags := binary.BigEndian.Uint16(h[4:])
	typ := binary.BigEndian.Uint16(h[6:])
	cookie := binary.BigEndian.Uint64(h[8:])
	length := binary.BigEndian.Uint32(h[16:])
	cl := cc.lookup(cookie, false)
	if cl == nil {
		return fmt.Errorf("chunk for unknown cookie %d", cookie)
	}
	switch {
	case typ == replyTypeOffsetData || typ == replyTypeOffsetHole:
		if cl.typ != cmdRead || length < 9 || typ == replyTypeOffsetHole && length != 12 {
			return fmt.Errorf("bad content chunk (type %d, %d bytes)", typ, length)
		}
		if _, err := io.ReadFull(cc.br, h[20:28]); err != nil {
			return err
		}
		off := binary.BigEndian.Uint64(h[20:])
		n := uint64(length - 8)
		if typ == replyTypeOffsetHole {
			if _, err := io.ReadFull(cc.br, h[:4]); err != nil {
				return err
			}
			n = uint64(binary.BigEndian.Uint32(h[:4]))
		}
		if off < cl.off || off-cl.off > uint64(cl.length) || n > uint64(cl.length)-(off-cl.off) || n == 0 {
			return fmt.Errorf("content chunk [%d, +%d) outside the request [%d, +%d)", off, n, cl.off, cl.length)
		}
		start, end := off-cl.off, off-cl.off+n
		for _, s := range cl.spans {
			if start < s[1] && s[0] < end {
				return fmt.Errorf("content chunk [%d, +%d) overlaps an earlier one of the same reply", off, n)
			}
		}
		cl.spans = append(cl.spans, [2]uint64{start, end})
		dst := cl.buf[start:end]
		if typ == replyTypeOffsetHole {
			clear(dst)
		} else if _, err := io.ReadFull(cc.br, dst); err != nil {
			return err
		}
		cl.got += n
	case typ == replyTypeNone:
		if length != 0 || flags&replyFlagDone == 0 {
			return errors.New("bad NBD_REPLY_TYPE_NONE chunk")
		}
	case typ&(1<<15) != 0:
		if length < 6 || length > 6+maxStringLen+64 {
			return fmt.Errorf("error chunk of %d bytes", length)
		}
		p := make([]byte, length)
		if _, err := io.ReadFull(cc.br, p); err != nil {
			return err
		}
		errno := binary.BigEndian.Uint32(p)
		mlen := int(binary.BigEndian.Uint16(p[4:]))
		if mlen > len(p)-6 {
			return errors.New("error chunk message longer than the chunk")
		}
		if cl.rerr == nil {
			if errno == 0 {
				errno = errInval // "MUST be nonzero"; treat as the spec says for odd values
			}
			cl.rerr = &RemoteError{Errno: errno, Message: string(p[6 : 6+mlen])}
		}
	default:
		return fmt.Errorf("unexpected chunk type %d", typ)
	}
	if flags&replyFlagDone == 0 {
		return nil
	}
	cc.lookup(cookie, true)
	if cl.rerr == nil && cl.typ == cmdRead && cl.got != uint64(cl.length) {
		cl.rerr = &RemoteError{Errno: errIO, Message: fmt.Sprintf("server sent %d of %d bytes", cl.got, cl.length)}
	}
	cc.complete(cl, cl.rerr)
	return nil
}

// RemoteError is an error answered by the server for one request. It unwraps to the
// matching syscall.Errno and, where one applies, to the blockdev error class: EIO to
// blockdev.ErrMedium (atrest's server answers EIO for a medium error or a timeout of
// its device), EPERM to blockdev.ErrReadOnly, ESHUTDOWN to blockdev.ErrGone (a server
// shutting down, or atrest's server with its device gone: to the caller the device is
// gone either way, and blockdev.ErrClosed would say that the caller closed it), ENOTSUP
// to blockdev.ErrNotFast for a fast zeroing and to blockdev.ErrNotSupported otherwise.
// EINVAL and ENOSPC have no class: a request out of range never leaves the client
// (it returns blockdev.ErrOutOfRange itself, checking against the export size), so from
// the server they mean something else (a request it refused, a full thin device).
type RemoteError struct {
	Op      string // "read", "write", "flush", "trim", "write-zeroes", "cache"
	Offset  int64
	Length  int64
	Errno   uint32 // NBD error value ("Error values")
	Message string // from a structured error chunk, if any

	fastZero bool // the request was a WRITE_ZEROES with FAST_ZERO
}

func (e *RemoteError) Error() string {
	s := fmt.Sprintf("nbd server answered %s to %s at %d (%d bytes)", errnoName(e.Errno), e.Op, e.Offset, e.Length)
	if e.Op == "flush" {
		s = fmt.Sprintf("nbd server answered %s to flush", errnoName(e.Errno))
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

func (e *RemoteError) Unwrap() []error {
	switch e.Errno {
	case errPerm:
		return []error{blockdev.ErrReadOnly, syscall.EPERM}
	case errIO:
		return []error{blockdev.ErrMedium, syscall.EIO}
	case errShutdown:
		return []error{blockdev.ErrGone, syscall.ESHUTDOWN}
	case errNotSup:
		if e.fastZero {
			return []error{blockdev.ErrNotFast, syscall.ENOTSUP}
		}
		return []error{blockdev.ErrNotSupported, syscall.ENOTSUP}
	case errNoMem, errInval, errNoSpc, errOverflow:
		return []error{syscall.Errno(e.Errno)}
	default:
		// "The client SHOULD treat an unexpected error value as if it had been NBD_EINVAL".
		return []error{syscall.EINVAL}
	}
}
