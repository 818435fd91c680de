package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// serverConn is one client connection. Its transmission phase has three parts:
//   - the reader role, held by one goroutine at a time (see readLoop), parses requests
//     from a buffered reader (one read system call brings in every request the client
//     has sent), takes a request slot and the payload bytes from the connection's
//     budget (its reserve or the server's pool, see sema.go: so memory and goroutines
//     are bounded), reads WRITE payloads into pooled buffers, and either runs a small
//     READ or WRITE itself ("inline", see run) or hands the request to a worker
//     goroutine;
//   - the workers run the other requests on the Device, one each, concurrently;
//   - replies are sent by whoever finds the connection idle (see send): several
//     replies per writev, header and payload without a copy; then the buffers and
//     budget units go back. A client that reads no reply for WriteTimeout is dropped
//     (see writeOut).
//
// Replies therefore go out in completion order, not request order ("Transmission").
type serverConn struct {
	s    *Server
	nc   net.Conn
	br   *bufio.Reader
	done chan struct{}

	ctx    context.Context // ends on stop and on a broken write; only the reader's budget waits use it
	cancel context.CancelFunc

	// Admission (see Server.admitLocked).
	peer   string       // the client's IP address for TCP, "" otherwise
	active atomic.Int64 // when the handshake last made progress, since s.clock

	stopping atomic.Bool
	exp      *export    // set by admit, under s.mu
	writer   connWriter // the writer rule's view of the connection (writer.go)
	dev      blockdev.Device

	structured bool
	flags      uint16

	budget   *budget
	jobs     chan job      // to idle workers; unbuffered
	quit     chan struct{} // closed when the reader stopped: idle workers exit
	reap     chan struct{} // an idle worker that receives from it exits
	reaper   *time.Timer   // reapIdle
	nworkers atomic.Int32
	workers  sync.WaitGroup
	dirty    atomic.Bool // a write was answered since the last flush

	// The reader role (see readLoop and runInline). role counts up: even while the
	// holder reads or parses, odd while it runs a request inline. The server's watchdog,
	// finding the same odd value twice rescueDelay apart, moves it on by 3 and starts a
	// new reader, so the holder's CAS from odd to the next even value fails and it knows
	// that it lost the role. Values never repeat, so a stale CAS cannot succeed.
	role       atomic.Uint64
	watchSeen  uint64        // role at the watchdog's last look; the watchdog's
	readerDone chan struct{} // closed by a reader that the watchdog started when it ends the connection
	// Owned by the holder of the reader role:
	batch      []*reply      // replies of inline requests, sent before the reader may block
	batchBytes int           // READ payload bytes in batch
	inlineOff  int           // requests to hand to workers before running inline again
	inlineCost time.Duration // mean time of an inline request

	// Replies: whoever queues a reply while nobody is writing becomes the writer and
	// sends everything queued, several replies per writev, until the queue is empty;
	// the others only queue. So an idle connection answers without waking another
	// goroutine, and a busy one batches.
	wmu     sync.Mutex
	pending []*reply      // under wmu
	spare   []*reply      // under wmu: the other half of the double buffer
	writing bool          // under wmu
	broken  bool          // only the writer touches it
	wseq    atomic.Uint64 // odd while the writer is in a write (see writeOut)
	wkick   atomic.Uint64 // the write the watch interrupted
	wseen   uint64        // wseq at the watch's last look; the watch's
	bufs    net.Buffers
	wbufs   net.Buffers
	scratch []byte
}

func newServerConn(s *Server, nc net.Conn) *serverConn {
	ctx, cancel := context.WithCancel(context.Background())
	return &serverConn{
		s: s, nc: nc, br: bufio.NewReaderSize(nc, readBuffer),
		done: make(chan struct{}), ctx: ctx, cancel: cancel,
		budget: newBudget(s.pool, s.cfg.MaxConnBytes, int64(s.cfg.MaxConnRequests)),
	}
}

// gracefulStop makes the reader stop at the next request; requests already read are
// answered before the connection closes.
func (c *serverConn) gracefulStop() {
	c.stopping.Store(true)
	c.cancel()
	_ = c.nc.SetReadDeadline(time.Unix(1, 0))
}

// forceClose closes the connection at once.
func (c *serverConn) forceClose() {
	c.stopping.Store(true)
	c.cancel()
	_ = c.nc.Close()
}

func (c *serverConn) serve() {
	defer c.cancel()
	defer c.nc.Close()
	e, err := c.handshake()
	c.s.endHandshake(c)
	if err != nil {
		if !errors.Is(err, errHandshakeDone) && !isClosedConn(err) {
			c.s.log.Info("nbd: handshake failed", "peer", c.nc.RemoteAddr(), "err", err)
		}
		return
	}
	if err := c.nc.SetDeadline(time.Time{}); err != nil {
		return
	}
	if c.stopping.Load() {
		return
	}
	c.dev = e.Device
	setSocketBuffers(c.nc)
	c.jobs = make(chan job)
	c.quit = make(chan struct{})
	c.reap = make(chan struct{})
	c.reaper = time.AfterFunc(workerIdle, c.reapIdle)
	c.reaper.Stop()
	c.readerDone = make(chan struct{})
	if !c.readLoop() {
		<-c.readerDone // the watchdog gave the reader role to another goroutine
	}

	close(c.quit)
	c.workers.Wait() // every reply has been sent (or dropped on a broken connection)
	c.reaper.Stop()
	if c.dirty.Load() {
		// Not required by the protocol (a client flushes what it needs durable), but a
		// disconnecting client's writes cost one flush to make safe.
		if err := c.dev.Flush(); err != nil {
			c.s.log.Error("nbd: flush after disconnect failed", "export", e.Name, "err", err)
		}
	}
}

func isClosedConn(err error) bool {
	var ne net.Error
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.As(err, &ne) && ne.Timeout() ||
		errors.Is(err, io.ErrClosedPipe)
}

// reply is one answer queued for the writer.
type reply struct {
	cookie uint64
	cmd    uint16
	errno  uint32
	msg    string
	off    uint64  // READ: offset of data
	data   *[]byte // READ: pooled payload
	held   hold    // budget units to give back once sent
}

var replyPool = sync.Pool{New: func() any { return new(reply) }}

// newReply returns a cleared reply from the pool; writeBatch puts it back.
func newReply(cookie uint64, cmd uint16) *reply {
	r := replyPool.Get().(*reply)
	*r = reply{cookie: cookie, cmd: cmd}
	return r
}

// Inline requests. A READ or WRITE of at most inlineMax bytes is run by the reader
// itself: on a fast device (memory, page cache, tmpfs) that saves the wake-up of a worker
// goroutine per request, which on a busy machine costs more than the request, and lets
// the replies of every request that one socket read brought in go out in one writev. So
// that a request that blocks (a slow or stuck drive) cannot hold up the others, the
// server's watchdog hands the reader role to a new goroutine after
// rescueDelay (see Server.watch); the connection then hands its requests to workers for
// the next inlineBackoff requests, as it does while inline requests take longer than
// inlineSlow on average (a device whose requests take that long gains from running them
// concurrently more than it loses to the wake-ups).
const (
	inlineMax     = 64 << 10
	inlineSlow    = 50 * time.Microsecond
	rescueDelay   = time.Millisecond
	inlineBackoff = 4096
	// maxBatchReplies and maxBatchBytes bound the inline replies held back for one
	// writev, so that the first of them is not delayed for long.
	maxBatchReplies = 64
	maxBatchBytes   = 1 << 20
)

// readLoop holds the reader role until the connection ends (it returns true: NBD_CMD_DISC,
// a stop, a failed connection, a client that broke the framing) or until the role was
// taken from it while it ran a request inline (false); it then has sent that request's
// reply and touches nothing of the role again.
func (c *serverConn) readLoop() (ended bool) {
	var hdr [requestHeaderLen]byte
	defer func() {
		if ended {
			c.flushBatch()
		}
	}()
	for !c.stopping.Load() {
		if c.br.Buffered() < requestHeaderLen {
			c.flushBatch() // the read may block: answer what is done first
		}
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			if !isClosedConn(err) {
				c.s.log.Info("nbd: reading a request failed", "peer", c.nc.RemoteAddr(), "err", err)
			}
			return true
		}
		var r request
		if !decodeRequest(hdr[:], &r) {
			// The framing is lost: nothing after this can be parsed ("Either side MAY
			// initiate a hard disconnect if it detects a violation").
			c.s.log.Warn("nbd: bad request magic; disconnecting", "peer", c.nc.RemoteAddr())
			_ = c.nc.Close()
			return true
		}
		if r.typ == cmdDisc {
			return true
		}
		switch c.handle(&r) {
		case handleEnd:
			return true
		case handleLost:
			return false
		}
	}
	return true
}

// takeOver is called by the watchdog when the reader role's holder has been running
// the same request inline (role v) for at least rescueDelay: it takes the role from it
// and gives it to a new goroutine, and the connection hands its requests to workers for
// a while.
func (c *serverConn) takeOver(v uint64) {
	if !c.role.CompareAndSwap(v, v+3) {
		return // the inline request has just ended
	}
	// The role is this goroutine's now, and then the new reader's.
	c.inlineOff = inlineBackoff
	c.workers.Add(1) // before serve can wait: the connection's reading has not ended
	go func() {
		defer c.workers.Done()
		if c.readLoop() {
			close(c.readerDone)
		}
	}()
}

// flushBatch sends the replies of inline requests.
func (c *serverConn) flushBatch() {
	if len(c.batch) == 0 {
		return
	}
	c.wmu.Lock()
	c.pending = append(c.pending, c.batch...)
	clear(c.batch)
	c.batch, c.batchBytes = c.batch[:0], 0
	c.writeLocked()
}

func (c *serverConn) allowedFlags(typ uint16) uint16 {
	var f uint16
	if c.flags&tflagSendFUA != 0 {
		f |= cmdFlagFUA
	}
	switch typ {
	case cmdRead:
		if c.flags&tflagSendDF != 0 {
			f |= cmdFlagDF
		}
	case cmdWriteZeroes:
		f |= cmdFlagNoHole
		if c.flags&tflagSendFastZero != 0 {
			f |= cmdFlagFastZero
		}
	}
	return f
}

// rangeOK reports whether [off, off+n) lies within the device.
func (c *serverConn) rangeOK(off uint64, n uint64) bool {
	size := uint64(c.dev.Size())
	return off <= math.MaxInt64 && off <= size && n <= size-off
}

// handleResult says how the reader goes on after a request.
type handleResult int

const (
	handleNext handleResult = iota // read the next request
	handleEnd                      // the connection must end
	handleLost                     // the reader role was taken over (see run)
)

// resultOf maps whether the connection goes on to a handleResult.
func resultOf(ok bool) handleResult {
	if ok {
		return handleNext
	}
	return handleEnd
}

// handle validates one request, answering invalid ones at once ("Error values"), and
// runs the others (see run).
func (c *serverConn) handle(r *request) handleResult {
	badFlags := r.flags&^c.allowedFlags(r.typ) != 0
	readOnly := c.flags&tflagReadOnly != 0
	maxReq := uint32(c.s.cfg.MaxRequestSize)
	refuse := func(errno uint32, msg string) handleResult {
		rep := newReply(r.cookie, r.typ)
		rep.errno, rep.msg = errno, msg
		return resultOf(c.queue(rep))
	}
	switch r.typ {
	case cmdWrite:
		var errno uint32
		var msg string
		switch {
		case r.length > maxReq:
			// The payload must be read to stay in sync; past twice the limit (and past
			// 2^25, which "SHOULD NOT be considered a denial of service attack") reading it
			// would be one, so the server disconnects ("Size constraints").
			if uint64(r.length) > 2*uint64(max(maxReq, 1<<25)) {
				c.s.log.Warn("nbd: oversized write; disconnecting", "peer", c.nc.RemoteAddr(), "length", r.length)
				return handleEnd
			}
			errno, msg = errInval, "write larger than the maximum payload size"
		case readOnly:
			errno, msg = errPerm, "read-only export"
		case badFlags:
			errno, msg = errInval, "invalid flags for a write"
		case !c.rangeOK(r.offset, uint64(r.length)):
			errno, msg = errNoSpc, "write beyond the end of the export"
		}
		if errno != 0 {
			c.flushBatch() // the read may block
			if _, err := io.CopyN(io.Discard, c.br, int64(r.length)); err != nil {
				return handleEnd
			}
			return refuse(errno, msg)
		}
		h, ok := c.acquire(int64(r.length))
		if !ok {
			return handleEnd
		}
		buf := getBuf(int(r.length))
		if c.br.Buffered() < len(*buf) {
			c.flushBatch() // the read may block
		}
		if _, err := io.ReadFull(c.br, *buf); err != nil {
			putBuf(buf)
			c.budget.release(h)
			return handleEnd
		}
		return c.run(r, buf, h)

	case cmdRead:
		switch {
		case badFlags:
			return refuse(errInval, "invalid flags for a read")
		case r.length > maxReq:
			// With structured replies a large read "MAY be rejected up front with
			// NBD_EOVERFLOW"; with simple replies it "will fail" (EINVAL).
			errno := uint32(errInval)
			if c.structured {
				errno = errOverflow
			}
			return refuse(errno, "read larger than the maximum payload size")
		case !c.rangeOK(r.offset, uint64(r.length)):
			return refuse(errInval, "read beyond the end of the export")
		}
		h, ok := c.acquire(int64(r.length))
		if !ok {
			return handleEnd
		}
		return c.run(r, nil, h)

	case cmdFlush:
		if badFlags || r.offset != 0 || r.length != 0 {
			return refuse(errInval, "flush with flags, offset or length")
		}
	case cmdTrim:
		switch {
		case readOnly:
			return refuse(errPerm, "read-only export")
		case c.flags&tflagSendTrim == 0:
			return refuse(errInval, "trim is not enabled on this export")
		case badFlags:
			return refuse(errInval, "invalid flags for a trim")
		case !c.rangeOK(r.offset, uint64(r.length)):
			return refuse(errInval, "trim beyond the end of the export")
		}
	case cmdWriteZeroes:
		switch {
		case readOnly:
			return refuse(errPerm, "read-only export")
		case badFlags:
			return refuse(errInval, "invalid flags for write-zeroes")
		case !c.rangeOK(r.offset, uint64(r.length)):
			return refuse(errNoSpc, "write-zeroes beyond the end of the export")
		}
	case cmdCache:
		switch {
		case badFlags:
			return refuse(errInval, "invalid flags for cache")
		case !c.rangeOK(r.offset, uint64(r.length)):
			return refuse(errInval, "cache beyond the end of the export")
		}
		// Advertised, and allowed to have no effect: the device has no cache to fill.
		return resultOf(c.queue(newReply(r.cookie, r.typ)))
	default:
		// NBD_CMD_BLOCK_STATUS (no metadata context can be negotiated) and unknown commands.
		return refuse(errInval, "unsupported command")
	}
	h, ok := c.acquire(0)
	if !ok {
		return handleEnd
	}
	c.start(r, nil, h)
	return handleNext
}

// acquire takes a request slot and n payload bytes from the connection's budget. Only
// the reader role's holder calls it. It fails when the connection is ending.
func (c *serverConn) acquire(n int64) (hold, bool) {
	if src := c.budget.tryAcquire(n); src != fromNone {
		return hold{n, src}, true
	}
	// The inline replies held back hold slots and bytes, maybe those it waits for.
	c.flushBatch()
	src := c.budget.acquire(c.ctx, n)
	return hold{n, src}, src != fromNone
}

// queue answers a request refused by the reader. The reply takes a request slot, like
// the others, so that a client that sends bad requests without reading the answers
// cannot make the queue grow; it returns false if the connection is ending.
func (c *serverConn) queue(r *reply) bool {
	h, ok := c.acquire(0)
	if !ok {
		return false
	}
	r.held = h
	c.send(r)
	return true
}

// job is a validated request handed to a worker.
type job struct {
	req  request
	buf  *[]byte // WRITE payload
	held hold    // budget units held for it
}

// readBuffer is the size of a connection's buffered reader: one read system call brings
// in every request a client at depth 32 can have sent with 4 KiB writes (32 x 4124 bytes)
// and most headers of larger writes.
const readBuffer = 256 << 10

// workerIdle is how often the idle workers of a connection are told to exit.
const workerIdle = 2 * time.Second

// run runs a validated request that holds a request slot and its payload bytes (h; and
// buf, a WRITE's payload): inline when it is a small READ or WRITE and the device has
// been fast, otherwise on a worker. See inlineMax.
func (c *serverConn) run(r *request, buf *[]byte, h hold) handleResult {
	if (r.typ == cmdRead || r.typ == cmdWrite && r.flags&cmdFlagFUA == 0) && r.length <= inlineMax {
		if c.inlineOff == 0 {
			return c.runInline(r, buf, h)
		}
		c.inlineOff--
		if c.inlineOff == 0 {
			c.inlineCost = 0 // try again afresh
		}
	}
	c.start(r, buf, h)
	return handleNext
}

// runInline runs r in the reader role's goroutine and keeps its reply for the next
// flushBatch. If the watchdog took the role over meanwhile, it sends the reply itself
// and returns handleLost.
func (c *serverConn) runInline(r *request, buf *[]byte, h hold) handleResult {
	rep := newReply(r.cookie, r.typ)
	rep.held = h
	v := c.role.Add(1) // odd: running inline, the watchdog may take the role over
	c.s.watchInline()
	start := time.Now()
	c.execute(r, buf, rep)
	took := time.Since(start)
	if !c.role.CompareAndSwap(v, v+1) {
		c.send(rep)
		return handleLost
	}
	// An exponentially weighted mean (1/8 per request), so that one request delayed by
	// the scheduler does not count as a slow device.
	c.inlineCost += (took - c.inlineCost) / 8
	if c.inlineCost > inlineSlow {
		c.inlineOff = inlineBackoff
	}
	c.batch = append(c.batch, rep)
	if rep.data != nil {
		c.batchBytes += len(*rep.data)
	}
	if len(c.batch) >= maxBatchReplies || c.batchBytes >= maxBatchBytes {
		c.flushBatch()
	}
	return handleNext
}

// start runs r in a worker; the worker owns buf (the WRITE payload) and the budget
// units held for it (h), which go back once its reply is sent. An idle worker takes the
// job if there is one; otherwise a new worker starts. Workers are bounded by the request
// slots (one per job) and stay until the reaper finds them idle, so that a busy
// connection reuses goroutines whose stacks have already grown.
func (c *serverConn) start(r *request, buf *[]byte, h hold) {
	j := job{req: *r, buf: buf, held: h}
	select {
	case c.jobs <- j:
		return
	default:
	}
	c.workers.Add(1)
	if c.nworkers.Add(1) == 1 {
		c.reaper.Reset(workerIdle)
	}
	go c.worker(j)
}

func (c *serverConn) worker(j job) {
	defer c.workers.Done()
	defer c.nworkers.Add(-1)
	for {
		rep := newReply(j.req.cookie, j.req.typ)
		rep.held = j.held
		c.execute(&j.req, j.buf, rep)
		c.send(rep)
		select {
		case j = <-c.jobs:
		case <-c.quit:
			return
		case <-c.reap:
			return
		}
	}
}

// reapIdle, every workerIdle while the connection has workers, makes those that are idle
// exit. (A timer per worker would cost a timer update per request.)
func (c *serverConn) reapIdle() {
	for {
		select {
		case c.reap <- struct{}{}:
			continue
		case <-c.quit:
			return
		default:
		}
		break
	}
	if c.nworkers.Load() > 0 {
		c.reaper.Reset(workerIdle)
	}
}

// execute runs a validated request on the device and fills in its reply.
func (c *serverConn) execute(r *request, buf *[]byte, rep *reply) {
	off := int64(r.offset)
	fua := r.flags&cmdFlagFUA != 0
	var err error
	switch r.typ {
	case cmdRead:
		if r.length == 0 {
			break
		}
		data := getBuf(int(r.length))
		var n int
		n, err = c.dev.ReadAt(*data, off)
		if n == len(*data) {
			err = nil // io.ReaderAt may return io.EOF with a read that ends at Size
		} else if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			putBuf(data)
		} else {
			rep.data, rep.off = data, r.offset
		}
	case cmdWrite:
		if fua {
			_, err = blockdev.WriteFUA(c.dev, *buf, off)
		} else {
			_, err = c.dev.WriteAt(*buf, off)
		}
		putBuf(buf)
	case cmdFlush:
		c.dirty.Store(false)
		err = c.dev.Flush()
	case cmdTrim:
		err = blockdev.Trim(c.dev, off, int64(r.length))
		if err == nil && fua {
			err = c.dev.Flush()
		}
	case cmdWriteZeroes:
		flags := blockdev.ZeroMayUnmap
		if r.flags&cmdFlagNoHole != 0 {
			flags = 0
		}
		if r.flags&cmdFlagFastZero != 0 {
			flags |= blockdev.ZeroFast
		}
		err = blockdev.WriteZeroes(c.dev, off, int64(r.length), flags)
		if err == nil && fua {
			err = c.dev.Flush()
		}
	default:
		panic("BUG: execute called for unvalidated command " + cmdName(r.typ))
	}
	switch r.typ {
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if !fua && !c.dirty.Load() {
			c.dirty.Store(true)
		}
	}
	if err != nil {
		rep.errno = errnoFor(err, r.typ)
		rep.msg = err.Error()
		if rep.errno == errIO {
			c.s.log.Error("nbd: device error", "export", c.exp.Name, "op", cmdName(r.typ), "offset", off, "length", r.length, "err", err)
		}
	}
}

// errnoFor maps a device error to an NBD error value ("Error values"), by its class
// where it has one. A device gone answers ESHUTDOWN, which makes a client disconnect
// and reconnect ("it MUST initiate a soft disconnect"): atrest's client then retries
// until its reconnect window passes and reports blockdev.ErrGone, or finds the device
// back (a drive reinserted) and goes on. A medium error or a timeout below answers EIO,
// a failure of this request only.
func errnoFor(err error, cmd uint16) uint32 {
	write := cmd == cmdWrite || cmd == cmdWriteZeroes
	switch {
	case errors.Is(err, blockdev.ErrGone), errors.Is(err, blockdev.ErrClosed):
		return errShutdown
	case errors.Is(err, blockdev.ErrMedium), errors.Is(err, blockdev.ErrTimeout):
		return errIO
	case errors.Is(err, blockdev.ErrOutOfRange):
		if write {
			return errNoSpc
		}
		return errInval
	case errors.Is(err, blockdev.ErrReadOnly), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EPERM),
		errors.Is(err, syscall.EACCES):
		return errPerm
	case errors.Is(err, blockdev.ErrNotFast):
		return errNotSup
	case errors.Is(err, blockdev.ErrNotSupported):
		return errInval
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errNoSpc
	default:
		return errIO
	}
}

// send queues r and, if nobody is writing, writes the queue until it is empty.
func (c *serverConn) send(r *reply) {
	c.wmu.Lock()
	c.pending = append(c.pending, r)
	c.writeLocked()
}

// writeLocked, called with wmu held, becomes the writer if nobody is and writes the
// queue until it is empty; it returns with wmu released.
func (c *serverConn) writeLocked() {
	if c.writing {
		c.wmu.Unlock()
		return
	}
	c.writing = true
	for len(c.pending) > 0 {
		batch := c.pending
		c.pending, c.spare = c.spare[:0], nil
		c.wmu.Unlock()
		c.writeBatch(batch)
		clear(batch)
		c.wmu.Lock()
		c.spare = batch[:0]
	}
	c.writing = false
	c.wmu.Unlock()
}

// writeBatch sends replies with one writev and gives back their buffers and semaphore
// units. After a write error it only gives back.
func (c *serverConn) writeBatch(batch []*reply) {
	if !c.broken {
		total := 0
		for _, r := range batch {
			total += c.replyHeaderLen(r)
		}
		if cap(c.scratch) < total {
			c.scratch = make([]byte, total)
		}
		scratch := c.scratch[:total]
		c.bufs = c.bufs[:0]
		pos := 0
		for _, r := range batch {
			l := c.replyHeaderLen(r)
			c.encodeReply(scratch[pos:pos+l], r)
			c.bufs = append(c.bufs, scratch[pos:pos+l])
			if r.data != nil {
				c.bufs = append(c.bufs, *r.data)
			}
			pos += l
		}
		c.wbufs = c.bufs // WriteTo consumes it; c.bufs keeps the array for the next batch
		if err := c.writeOut(); err != nil {
			c.broken = true
			switch {
			case errors.Is(err, errStalled):
				c.s.log.Warn(fmt.Sprintf("nbd: client has taken no reply for %v; disconnecting", c.s.cfg.WriteTimeout), "peer", c.nc.RemoteAddr())
			case !isClosedConn(err):
				c.s.log.Info("nbd: writing replies failed", "peer", c.nc.RemoteAddr(), "err", err)
			}
			c.cancel()       // ends the reader's wait for budget
			_ = c.nc.Close() // wakes the reader
		}
		clear(c.bufs[:cap(c.bufs)])
	}
	for _, r := range batch {
		if r.data != nil {
			putBuf(r.data)
		}
		if r.held.src != fromNone {
			c.budget.release(r.held)
		}
		*r = reply{}
		replyPool.Put(r)
	}
}

// errStalled: the client has taken none of its replies for WriteTimeout.
var errStalled = errors.New("replies not taken")

// writeOut writes c.wbufs, all of it, unless the connection breaks or the client takes
// none of it for WriteTimeout: such a client would hold the budget of its replies for
// good. The server's write watch (Server.watchWrites) interrupts every write it finds in
// progress at two of its looks in a row, writeCheck apart, with a write deadline in the
// past; the writer notes whether a byte went out since the write began and goes on,
// until none has for WriteTimeout. So a client that reads nothing is dropped after
// WriteTimeout and at most twice that, and one that reads slowly never. (A deadline set
// before each write would cost a clock read and a timer update per writev on the fast
// path; the watch costs two atomic adds.)
func (c *serverConn) writeOut() error {
	var idle time.Time // since when nothing went out (at the latest), once interrupted
	for {
		seq := c.wseq.Add(1) // odd while writing
		n, err := c.wbufs.WriteTo(c.nc)
		c.wseq.Add(1)
		if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		// Interrupted by the watch, or by its deadline meant for a write that had just
		// ended (the watch sets wkick first).
		if err := c.nc.SetWriteDeadline(time.Time{}); err != nil {
			return err
		}
		now := time.Now()
		switch {
		case n > 0:
			idle = now
		case c.wkick.Load() != seq:
		case idle.IsZero():
			// Nothing since the write began, which the watch saw a look earlier.
			idle = now.Add(-c.s.writeCheck)
		}
		if n == 0 && c.wkick.Load() == seq && now.Sub(idle) >= c.s.cfg.WriteTimeout {
			return errStalled
		}
	}
}

// checkWrite is the write watch's look at c (see writeOut); only Server.watchWrites
// calls it.
func (c *serverConn) checkWrite() {
	v := c.wseq.Load()
	if v%2 == 1 && v == c.wseen {
		c.wkick.Store(v)
		_ = c.nc.SetWriteDeadline(time.Unix(1, 0))
	}
	c.wseen = v
}

// replyHeaderLen is the length of what encodeReply appends for r.
func (c *serverConn) replyHeaderLen(r *reply) int {
	if !c.structured {
		return simpleReplyLen
	}
	switch {
	case r.errno != 0:
		return structuredHeaderLen + 6 + min(len(r.msg), maxStringLen)
	case r.cmd == cmdRead && r.data != nil:
		return structuredHeaderLen + 8
	case r.cmd == cmdRead:
		return structuredHeaderLen
	default:
		return simpleReplyLen
	}
}

// encodeReply writes the header of r (and an error chunk's message) to h, which is
// replyHeaderLen(r) bytes long.
func (c *serverConn) encodeReply(h []byte, r *reply) {
	if !c.structured || (r.cmd != cmdRead && r.errno == 0) {
		// A simple reply: always without structured replies; with them, allowed for
		// anything but READ when there is no payload ("Simple reply message").
		putSimpleReply(h, r.errno, r.cookie)
		return
	}
	switch {
	case r.errno != 0:
		msg := r.msg
		if len(msg) > maxStringLen {
			msg = msg[:maxStringLen]
		}
		putStructuredHeader(h, replyFlagDone, replyTypeError, r.cookie, uint32(6+len(msg)))
		binary.BigEndian.PutUint32(h[20:], r.errno)
		binary.BigEndian.PutUint16(h[24:], uint16(len(msg)))
		copy(h[26:], msg)
	case r.data != nil:
		// The whole payload was read before this header is sent, so no error can follow
		// and the data chunk can be the final one.
		putStructuredHeader(h, replyFlagDone, replyTypeOffsetData, r.cookie, uint32(8+len(*r.data)))
		binary.BigEndian.PutUint64(h[20:], r.off)
	default:
		// A zero-length read: no content chunk can describe zero bytes.
		putStructuredHeader(h, replyFlagDone, replyTypeNone, r.cookie, 0)
	}
}
