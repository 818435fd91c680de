package nbd

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/atrest/atrest/blockdev"
)

// ClientOptions tune a Client. The zero value is usable.
type ClientOptions struct {
	// Export overrides the export named by the address ("" keeps it).
	Export string
	// Connections is how many connections to open when the server advertises
	// NBD_FLAG_CAN_MULTI_CONN (default 4); otherwise one is used.
	Connections int
	// MaxInFlight bounds the requests in flight per connection (default 64).
	MaxInFlight int
	// DialTimeout bounds one connection attempt, handshake included (default 10 s).
	DialTimeout time.Duration
	// ReconnectTimeout bounds how long a request waits for a connection while the
	// client reconnects, counted from the moment that request began to wait, before it
	// fails with ErrDisconnected (default 60 s; negative: never reconnect, fail at
	// once). Once a request has waited that long in vain the client gives up: later
	// requests fail at once, until the reconnect, which goes on, succeeds (see Client).
	ReconnectTimeout time.Duration
	// ReplayBytes bounds the replay log: the writes answered since the last Flush, kept
	// so that they can be sent again after a reconnect (default 64 MiB; when it is full
	// the client flushes by itself to empty it). Negative disables the log; a Flush
	// after a reconnect then reports ErrWritesLost when writes were not yet flushed.
	ReplayBytes int64
	// ReadOnly says that the client never writes. It tells atrest's server so (the
	// read-only intent of NBD_OPT_ATREST_CLIENT, docs/nbd.md), which then never counts
	// it as the volume's writer; its writes fail with blockdev.ErrReadOnly.
	ReadOnly bool
	// TakeOver asks atrest's server, at Dial only, to end the connections of the
	// volume's current writer and make this client the writer instead. The writer taken
	// over loses what it had not flushed and may not write to the volume again; if it
	// is alive, its file system sees I/O errors. Reconnects never take over.
	TakeOver bool
	// Description names the client for people: atrest's server tells it to the
	// clients it refuses because this one is the volume's writer (default "PROGRAM (pid
	// N on host H)"). Characters that are not printable are replaced, and it is cut at
	// 256 bytes.
	Description string
	// Logger receives a record per lost connection, reconnect and give-up, with the
	// server and the error as attributes. Nil discards them.
	Logger *slog.Logger
}

func (o ClientOptions) withDefaults() ClientOptions {
	if o.Logger == nil {
		o.Logger = discardLogger
	}
	if o.Connections <= 0 {
		o.Connections = 4
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = 64
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 10 * time.Second
	}
	if o.ReconnectTimeout == 0 {
		o.ReconnectTimeout = 60 * time.Second
	}
	if o.ReplayBytes == 0 {
		o.ReplayBytes = 64 << 20
	}
	if o.Description == "" {
		host, _ := os.Hostname()
		o.Description = fmt.Sprintf("%s (pid %d on host %s)", filepath.Base(os.Args[0]), os.Getpid(), host)
	}
	o.Description = sanitizeDescription(o.Description)
	return o
}

// sanitizeDescription makes s fit NBD_OPT_ATREST_CLIENT: printable UTF-8 of at most
// maxWriterDescription bytes.
func sanitizeDescription(s string) string {
	s = strings.Map(func(r rune) rune {
		if !unicode.IsPrint(r) {
			return '?'
		}
		return r
	}, strings.ToValidUTF8(s, "?"))
	for len(s) > maxWriterDescription {
		_, n := utf8.DecodeLastRuneInString(s)
		s = s[:len(s)-n]
	}
	return s
}

var (
	// ErrDisconnected is returned (wrapped, with the last dial error) by requests that
	// found no connection within ClientOptions.ReconnectTimeout, and by every request
	// while the client has given up (see Client). It is of the class blockdev.ErrGone:
	// to the layer above, the device is gone.
	ErrDisconnected = fmt.Errorf("%w: connection to the nbd server lost", blockdev.ErrGone)
	// ErrWritesLost is returned once by Flush when a connection dropped while writes
	// answered on it were not yet flushed and the replay log could not keep them: if
	// the server crashed rather than restarted cleanly, they may be gone. It is of the
	// class blockdev.ErrMedium, as a failed fsync after lost write-back is.
	ErrWritesLost = fmt.Errorf("%w: the nbd connection dropped before writes were flushed; they may be lost", blockdev.ErrMedium)
	// ErrNoExport is returned (wrapped, with the server's message) by Dial when the
	// server has no export of the name asked for.
	ErrNoExport = errors.New("no such export")
	// ErrVolumeBusy is returned (wrapped, with the server's message: the volume, the
	// writer that holds it and since when) by Dial when atrest's server refuses this
	// client write access because another writer holds the volume (docs/nbd.md). After
	// a reconnect the client tries again until ReconnectTimeout.
	ErrVolumeBusy = errors.New("another writer holds the volume")
	// ErrTakenOver is returned (wrapped, with the server's message) once another client
	// took the volume over (ClientOptions.TakeOver): this client may not write to it
	// again. After a reconnect it is permanent, as ErrVolumeChanged.
	ErrTakenOver = errors.New("another writer took the volume over")
	// ErrVolumeChanged is returned (wrapped, with both identities) by every request
	// once a reconnect reached a server that advertises another volume identity than
	// at first connect (or one where there was none, or none where there was one): the
	// export name now serves another volume. It is permanent: the client sent nothing
	// to that server and never reconnects again.
	ErrVolumeChanged = errors.New("the export serves another volume than at first connect")
)

// Client is a blockdev.Device backed by an export of an NBD server.
//
// It implements every optional capability of blockdev; those the server does not
// advertise return blockdev.ErrNotSupported (Trim, and Flush without SEND_FLUSH), fall
// back to plain writes (WriteZeroes without SEND_WRITE_ZEROES) or to a write and a Flush
// (WriteAtFUA without SEND_FUA). Its Caps are the server's transmission flags. Requests
// larger than the server's maximum payload are split and sent together.
//
// Errors keep their class across the wire (see RemoteError): the server's EIO is
// blockdev.ErrMedium, EPERM blockdev.ErrReadOnly, ESHUTDOWN blockdev.ErrGone (the
// client reconnects first, and reports ErrDisconnected, also ErrGone, when its window
// passed).
//
// # Reconnection and durability
//
// When a connection drops, the client closes all of them, dials again with backoff (at
// most a second apart) until it succeeds or is closed, and sends the requests that
// were in flight again (reads, and writes, which are idempotent at a fixed offset).
// Meanwhile each request waits for the new connection for at most ReconnectTimeout,
// counted from when it began to wait; the first one that waits that long in vain fails
// with ErrDisconnected and the client gives up: from then on new requests fail at once
// instead of waiting (so that a read(2), which the kernel may send as several requests
// one after the other, fails after ReconnectTimeout and not a multiple of it), until a
// reconnect succeeds and requests are served again. Requests already waiting keep their
// own deadline. With ReconnectTimeout < 0 the requests
// in flight on the dropped connection fail with ErrDisconnected and the client goes on
// with its other connections, if it has any. Writes that were answered but not yet
// flushed are in the replay log: it is sent again, in order, before any other request
// on the new connections, so a server that crashed and lost its volatile cache gets
// them back, and the next Flush is honest. Without the log (ReplayBytes < 0), that
// Flush reports ErrWritesLost once, as fsync reports a lost write-back.
//
// A Client is safe for concurrent use; Close must not race with other calls.
type Client struct {
	addr Address
	opts ClientOptions
	size int64

	// writerID is the client's writer identity for atrest's server (NBD_OPT_ATREST_CLIENT):
	// random, the same on every connection and reconnect.
	writerID [writerIDLen]byte
	volume   VolumeID // pinned at Dial

	mu      sync.Mutex
	cond    *sync.Cond
	state   clientState
	conns   []*clientConn
	info    exportInfo
	epoch   uint64
	failErr error // stateFailed: why (ReconnectTimeout < 0, or failForGood)
	dialErr error // stateDown: why the last reconnect attempt failed
	gaveUp  error // stateDown: set once a request waited ReconnectTimeout in vain
	calls   sync.WaitGroup
	closeCh chan struct{}
	bg      sync.WaitGroup
	rr      atomic.Uint64

	log replayLog
}

type clientState int

const (
	stateUp     clientState = iota
	stateDown               // reconnecting
	stateFailed             // no reconnect: no connection left with ReconnectTimeout < 0, or failed for good
	stateClosed
)

var (
	_ blockdev.Device       = (*Client)(nil)
	_ blockdev.Trimmer      = (*Client)(nil)
	_ blockdev.ZeroWriter   = (*Client)(nil)
	_ blockdev.FUAWriter    = (*Client)(nil)
	_ blockdev.BlockSizer   = (*Client)(nil)
	_ blockdev.CapsReporter = (*Client)(nil)
)

// Dial connects to addr (see ParseAddress) and negotiates the export. With
// CAN_MULTI_CONN it opens up to opts.Connections connections. It pins the volume
// identity that atrest's server advertises (see VolumeID); every reconnect must find
// the same (or none again, where there was none), or the client fails for good with
// ErrVolumeChanged before it sends a request.
func Dial(ctx context.Context, addr string, opts ClientOptions) (*Client, error) {
	a, err := ParseAddress(addr)
	if err != nil {
		return nil, err
	}
	if opts.Export != "" {
		a.Export = opts.Export
	}
	c := &Client{addr: a, opts: opts.withDefaults(), closeCh: make(chan struct{})}
	c.cond = sync.NewCond(&c.mu)
	c.log.limit = c.opts.ReplayBytes
	rand.Read(c.writerID[:])
	conns, info, err := c.dialAll(ctx, 1)
	if err != nil {
		return nil, err
	}
	c.size = info.size
	c.volume = info.volume
	c.install(conns, info, 1)
	return c, nil
}

// dialAll opens the connections of one epoch and starts their readers. Only those of
// the first epoch (Dial) ask to take the volume over.
func (c *Client) dialAll(ctx context.Context, epoch uint64) ([]*clientConn, exportInfo, error) {
	takeOver := epoch == 1 && c.opts.TakeOver
	first, err := c.dialConn(ctx, takeOver)
	if err != nil {
		return nil, exportInfo{}, err
	}
	conns := []*clientConn{first}
	if first.info.has(tflagCanMultiConn) && c.opts.Connections > 1 {
		extra := make([]*clientConn, c.opts.Connections-1)
		var wg sync.WaitGroup
		for i := range extra {
			wg.Go(func() {
				if cc, err := c.dialConn(ctx, takeOver); err == nil {
					if cc.info != first.info {
						cc.nc.Close()
						return
					}
					extra[i] = cc
				}
			})
		}
		wg.Wait()
		for _, cc := range extra {
			if cc != nil {
				conns = append(conns, cc)
			}
		}
	}
	for _, cc := range conns {
		cc.epoch = epoch
		cc.start()
	}
	return conns, first.info, nil
}

// install makes conns the client's connections, unless the client was closed
// meanwhile: then it closes them and returns false.
func (c *Client) install(conns []*clientConn, info exportInfo, epoch uint64) bool {
	c.mu.Lock()
	if c.state == stateClosed {
		c.mu.Unlock()
		for _, cc := range conns {
			cc.nc.Close()
		}
		return false
	}
	c.conns, c.info, c.epoch, c.state = conns, info, epoch, stateUp
	c.dialErr, c.gaveUp = nil, nil
	c.cond.Broadcast()
	c.mu.Unlock()
	return true
}

// begin registers a call; it fails once the client is closed.
func (c *Client) begin() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateClosed {
		return blockdev.ErrClosed
	}
	c.calls.Add(1)
	return nil
}

// conn returns a connection to send on, waiting for a reconnect if one runs: until
// *deadline, which it sets when the call first has to wait (see ClientOptions.
// ReconnectTimeout), or not at all once the client has given up.
func (c *Client) conn(deadline *time.Time) (*clientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		switch c.state {
		case stateUp:
			return c.conns[c.rr.Add(1)%uint64(len(c.conns))], nil
		case stateClosed:
			return nil, blockdev.ErrClosed
		case stateFailed:
			return nil, c.failErr
		case stateDown:
			now := time.Now()
			if deadline.IsZero() {
				if c.gaveUp != nil {
					return nil, c.gaveUp
				}
				*deadline = now.Add(c.opts.ReconnectTimeout)
			}
			if !now.Before(*deadline) {
				if c.gaveUp == nil {
					c.gaveUp = fmt.Errorf("%w: no connection to %s for %v", ErrDisconnected, c.addr, c.opts.ReconnectTimeout)
					if c.dialErr != nil {
						c.gaveUp = fmt.Errorf("%w: %w", c.gaveUp, c.dialErr)
					}
					c.opts.Logger.Warn("nbd: requests fail at once until it is back", "err", c.gaveUp)
				}
				return nil, c.gaveUp
			}
			c.waitLocked(deadline.Sub(now))
		}
	}
}

// waitLocked waits for a change of state (cond), for at most d.
func (c *Client) waitLocked(d time.Duration) {
	t := time.AfterFunc(d, func() {
		c.mu.Lock()
		c.cond.Broadcast()
		c.mu.Unlock()
	})
	c.cond.Wait()
	t.Stop()
}

// currentInfo returns what the connections in use negotiated.
func (c *Client) currentInfo() exportInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.info
}

// do sends one request, again on a new connection when its connection drops.
func (c *Client) do(cl *call) error {
	var deadline time.Time // set once the request has to wait for a connection
	backoff := 10 * time.Millisecond
	for {
		cc, err := c.conn(&deadline)
		if err != nil {
			return err
		}
		err = cc.roundTrip(cl)
		if !errors.Is(err, errConnLost) {
			return err
		}
		c.connLost(cc, err)
		if c.opts.ReconnectTimeout < 0 {
			// Never sent again: the request may still run on the server, after later ones.
			return fmt.Errorf("%s at %d: %w: %w", cmdName(cl.typ), cl.off, ErrDisconnected, err)
		}
		// A request that the server drops the connection for, again and again, must not
		// loop for ever: its deadline runs from the first drop.
		if deadline.IsZero() {
			deadline = time.Now().Add(c.opts.ReconnectTimeout)
			continue
		}
		if !time.Now().Before(deadline) {
			return fmt.Errorf("%s at %d: %w", cmdName(cl.typ), cl.off, ErrDisconnected)
		}
		// Lost again, on a connection that was made for it: the server ends the
		// connection for this request (ESHUTDOWN from atrest's server whose device is
		// gone). Each try costs a reconnect, so they grow apart.
		select {
		case <-time.After(backoff):
		case <-c.closeCh:
		}
		backoff = min(2*backoff, time.Second)
	}
}

// connLost starts a reconnect when cc is a connection in use. Without reconnects
// (ReconnectTimeout < 0) it only stops using cc: requests in flight on the other
// connections go on (their replies may be on the way), and the client fails once it has
// no connection left.
func (c *Client) connLost(cc *clientConn, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state != stateUp || cc.epoch != c.epoch {
		return
	}
	if c.log.droppedDirty() {
		c.log.setLost()
	}
	if c.opts.ReconnectTimeout < 0 {
		i := slices.Index(c.conns, cc)
		if i < 0 {
			return // already dropped
		}
		c.opts.Logger.Warn("nbd: connection to the server lost", "server", c.addr, "err", err)
		_ = cc.nc.Close()
		c.conns = slices.Delete(slices.Clone(c.conns), i, i+1)
		if len(c.conns) == 0 {
			c.state = stateFailed
			c.failErr = fmt.Errorf("%w: %w", ErrDisconnected, err)
			c.cond.Broadcast()
		}
		return
	}
	c.opts.Logger.Warn("nbd: connection to the server lost", "server", c.addr, "err", err)
	for _, o := range c.conns {
		_ = o.nc.Close() // everything in flight is sent again after the replay
	}
	c.startReconnectLocked()
}

func (c *Client) startReconnectLocked() {
	c.state = stateDown
	epoch := c.epoch + 1
	c.cond.Broadcast()
	c.bg.Add(1)
	go func() {
		defer c.bg.Done()
		c.reconnect(epoch)
	}()
}

// reconnect dials until it succeeds, then replays the log; it gives up only when the
// client is closed. (Requests stop waiting for it by their own deadlines: see conn.)
func (c *Client) reconnect(epoch uint64) {
	backoff := 10 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-c.closeCh:
			cancel()
		case <-ctx.Done():
		}
	}()
	busy := false // the last attempt was refused because another writer holds the volume
	for {
		conns, info, err := c.dialAll(ctx, epoch)
		if errors.Is(err, ErrVolumeBusy) {
			// Another writer got the volume meanwhile: never a reason to write elsewhere;
			// try again (requests wait by their own deadlines), it may go away.
			if !busy {
				c.opts.Logger.Warn("nbd: reconnect refused; trying again", "server", c.addr, "err", err)
			}
			busy = true
		} else {
			busy = false
		}
		if err == nil && info.volume != c.volume {
			err = fmt.Errorf("%w: %s now serves volume %s, not %s", ErrVolumeChanged, c.addr, info.volume, c.volume)
		}
		if errors.Is(err, ErrVolumeChanged) || errors.Is(err, ErrTakenOver) {
			for _, cc := range conns {
				cc.nc.Close()
			}
			c.failForGood(err)
			return
		}
		if err == nil && info.size != c.size {
			err = fmt.Errorf("export size changed from %d to %d bytes", c.size, info.size)
		}
		if err == nil {
			// A server that accepted but does not answer must not hold up Close.
			stop := context.AfterFunc(ctx, func() { conns[0].nc.Close() })
			err = c.replay(conns[0])
			stop()
		}
		if err == nil {
			if c.install(conns, info, epoch) {
				c.opts.Logger.Info("nbd: reconnected", "server", c.addr)
			}
			return
		}
		for _, cc := range conns {
			cc.nc.Close()
		}
		c.mu.Lock()
		c.dialErr = err
		c.mu.Unlock()
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
		backoff = min(2*backoff, time.Second)
	}
}

// failForGood makes every pending and later request fail with err, for good: the
// client does not reconnect again.
func (c *Client) failForGood(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == stateClosed {
		return
	}
	c.opts.Logger.Error("nbd: every request fails from now on", "err", err)
	c.failErr, c.state = err, stateFailed
	c.cond.Broadcast()
}

// replay sends the replay log again, in order, one request at a time (entries may
// overlap, and only their order makes the result right).
func (c *Client) replay(cc *clientConn) error {
	defer c.log.endReplay()
	for _, e := range c.log.snapshot() {
		cl := &call{typ: e.typ, flags: e.flags, off: e.off, length: e.length, buf: e.data}
		err := cc.roundTrip(cl)
		var rerr *RemoteError
		if errors.As(err, &rerr) {
			// The write failed on the new server: it can no longer be made durable.
			c.log.setLost()
			continue
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// Unflushed returns how many writes (trims and zeroings included) the client has sent
// or had answered that no successful Flush covers yet, and how many bytes they change:
// what the server may not hold durably, kept in the replay log to be sent again after
// a reconnect, and lost if the client is abandoned before a Flush. Without the replay
// log (ReplayBytes < 0) it counts only the writes answered, and bytes is -1.
func (c *Client) Unflushed() (writes int, bytes int64) { return c.log.unflushed() }

// Size returns the size of the export.
func (c *Client) Size() int64 { return c.size }

// VolumeID returns the volume identity that the server advertised at Dial
// (NBD_INFO_ATREST_VOLUME, docs/nbd.md), which every reconnect must find again; zero if
// it advertised none (other servers).
func (c *Client) VolumeID() VolumeID { return c.volume }

// PreferredBlockSize returns the server's preferred block size (4096 by default).
func (c *Client) PreferredBlockSize() int { return int(c.currentInfo().prefBlock) }

// Caps are what the server advertised on the connections in use: READ_ONLY, SEND_TRIM,
// SEND_WRITE_ZEROES, SEND_FAST_ZERO and SEND_FUA, and the preferred block size. They
// change only at a reconnect, to a server that advertises other flags.
func (c *Client) Caps() blockdev.Caps {
	i := c.currentInfo()
	if i.has(tflagReadOnly) {
		return blockdev.Caps{ReadOnly: true, BlockSize: int(i.prefBlock)}
	}
	return blockdev.Caps{
		Trim:      i.has(tflagSendTrim),
		Zeroes:    i.has(tflagSendWriteZeroes),
		FastZero:  i.has(tflagSendWriteZeroes) && i.has(tflagSendFastZero),
		FUA:       i.has(tflagSendFUA),
		BlockSize: int(i.prefBlock),
	}
}

// ExportInfo describes the export as the server advertised it.
type ExportInfo struct {
	Size                                      int64
	MinBlock, PreferredBlock, MaxPayload      uint32
	ReadOnly, CanFlush, CanFUA, CanTrim       bool
	CanWriteZeroes, CanFastZero, CanMultiConn bool
	CanCache, StructuredReplies, Rotational   bool
	Connections                               int
	Volume                                    VolumeID // zero: none advertised
}

// Info returns what the server advertised on the connections in use.
func (c *Client) Info() ExportInfo {
	c.mu.Lock()
	i, n := c.info, len(c.conns)
	c.mu.Unlock()
	return ExportInfo{
		Size: i.size, MinBlock: i.minBlock, PreferredBlock: i.prefBlock, MaxPayload: i.maxPayload,
		ReadOnly: i.has(tflagReadOnly), CanFlush: i.has(tflagSendFlush), CanFUA: i.has(tflagSendFUA),
		CanTrim: i.has(tflagSendTrim), CanWriteZeroes: i.has(tflagSendWriteZeroes),
		CanFastZero: i.has(tflagSendFastZero), CanMultiConn: i.has(tflagCanMultiConn),
		CanCache: i.has(tflagSendCache), StructuredReplies: i.structured, Rotational: i.has(tflagRotational),
		Connections: n, Volume: i.volume,
	}
}

// aligned checks the server's minimum block size ("Size constraints": the client "MUST
// abide by" it after asking for NBD_INFO_BLOCK_SIZE).
func (c *Client) aligned(info exportInfo, off, n int64) error {
	m := int64(info.minBlock)
	if off%m != 0 || n%m != 0 {
		return fmt.Errorf("offset %d length %d not aligned to the server's %d-byte minimum block: %w", off, n, m, blockdev.ErrNotSupported)
	}
	return nil
}

// pieces splits [off, off+n) into requests of at most max bytes and runs fn on each,
// concurrently when there are several.
func pieces(off, n int64, max int64, fn func(off, n int64) error) error {
	if n == 0 {
		return nil // "The client SHOULD NOT request a ... length of 0"
	}
	if n <= max {
		return fn(off, n)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	for n > 0 {
		l := min(n, max)
		o := off
		wg.Go(func() {
			if err := fn(o, l); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		})
		off += l
		n -= l
	}
	wg.Wait()
	return first
}

// ReadAt reads len(p) bytes at off; see blockdev.Device for the behaviour at the end.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, blockdev.CheckRange(off, int64(len(p)), c.size)
	}
	if off >= c.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := min(int64(len(p)), c.size-off)
	if err := c.begin(); err != nil {
		return 0, err
	}
	defer c.calls.Done()
	info := c.currentInfo()
	if err := c.aligned(info, off, n); err != nil {
		return 0, err
	}
	var err error
	if n <= int64(info.maxPayload) {
		err = c.readPiece(p[:n], off) // without the closure, which would be allocated
	} else {
		err = pieces(off, n, int64(info.maxPayload), func(o, l int64) error {
			return c.readPiece(p[o-off:o-off+l], o)
		})
	}
	if err != nil {
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// WriteAt writes p at off; a write that does not fit writes nothing.
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	return c.write(p, off, 0)
}

// WriteAtFUA writes p at off and returns once it is durable: with NBD_CMD_FLAG_FUA
// where advertised, otherwise with a Flush after the write.
func (c *Client) WriteAtFUA(p []byte, off int64) (int, error) {
	info := c.currentInfo()
	if info.has(tflagSendFUA) {
		return c.write(p, off, cmdFlagFUA)
	}
	if !info.has(tflagSendFlush) {
		return 0, fmt.Errorf("fua write: %w", blockdev.ErrNotSupported)
	}
	n, err := c.write(p, off, 0)
	if err != nil {
		return n, err
	}
	return n, c.Flush()
}

func (c *Client) write(p []byte, off int64, flags uint16) (int, error) {
	if err := blockdev.CheckRange(off, int64(len(p)), c.size); err != nil {
		return 0, err
	}
	if err := c.begin(); err != nil {
		return 0, err
	}
	defer c.calls.Done()
	info := c.currentInfo()
	if info.has(tflagReadOnly) {
		return 0, blockdev.ErrReadOnly
	}
	if err := c.aligned(info, off, int64(len(p))); err != nil {
		return 0, err
	}
	var err error
	if len(p) <= int(info.maxPayload) {
		err = c.writePiece(p, off, flags)
	} else {
		err = pieces(off, int64(len(p)), int64(info.maxPayload), func(o, l int64) error {
			return c.writePiece(p[o-off:o-off+l], o, flags)
		})
	}
	if err != nil {
		return 0, err
	}
	c.maybeAutoFlush()
	return len(p), nil
}

// readPiece and writePiece send one READ or WRITE of at most the maximum payload.
func (c *Client) readPiece(p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	cl := newCall(cmdRead, 0, uint64(off), uint32(len(p)), p)
	err := c.do(cl)
	putCall(cl)
	return err
}

func (c *Client) writePiece(p []byte, off int64, flags uint16) error {
	if len(p) == 0 {
		return nil // "The client SHOULD NOT request a ... length of 0"
	}
	cl := newCall(cmdWrite, flags, uint64(off), uint32(len(p)), p)
	err := c.logged(cl)
	putCall(cl)
	return err
}

// logged sends a changing request with its replay log entry.
func (c *Client) logged(cl *call) error {
	e := c.log.add(cl)
	err := c.do(cl)
	c.log.finish(e, err)
	return err
}

// maybeAutoFlush empties a full replay log with a Flush.
func (c *Client) maybeAutoFlush() {
	if !c.log.full() || !c.currentInfo().has(tflagSendFlush) {
		return
	}
	if !c.log.autoFlushing.CompareAndSwap(false, true) {
		return
	}
	defer c.log.autoFlushing.Store(false)
	if err := c.flush(); err != nil && !errors.Is(err, ErrWritesLost) {
		// The log cannot be emptied honestly; drop it and tell the next Flush.
		c.log.dropAll()
	}
}

// Flush returns once every write answered before it is durable on the server.
//
// With NBD_FLAG_CAN_MULTI_CONN one NBD_CMD_FLUSH covers the writes answered on every
// connection ("the effects of NBD_CMD_FLUSH ... MUST be visible across all
// connections"), so it goes out on one of them.
func (c *Client) Flush() error {
	if err := c.begin(); err != nil {
		return err
	}
	defer c.calls.Done()
	return c.flush()
}

func (c *Client) flush() error {
	if !c.currentInfo().has(tflagSendFlush) {
		return fmt.Errorf("flush: %w", blockdev.ErrNotSupported)
	}
	mark := c.log.startFlush()
	if err := c.do(&call{typ: cmdFlush}); err != nil {
		return err
	}
	if c.log.flushed(mark) {
		return ErrWritesLost
	}
	return nil
}

// Trim discards [off, off+n), if the server advertised NBD_FLAG_SEND_TRIM.
func (c *Client) Trim(off, n int64) error {
	if err := blockdev.CheckRange(off, n, c.size); err != nil {
		return err
	}
	if err := c.begin(); err != nil {
		return err
	}
	defer c.calls.Done()
	info := c.currentInfo()
	if info.has(tflagReadOnly) {
		return blockdev.ErrReadOnly
	}
	if !info.has(tflagSendTrim) {
		return fmt.Errorf("trim: %w", blockdev.ErrNotSupported)
	}
	if err := c.aligned(info, off, n); err != nil {
		return err
	}
	err := pieces(off, n, int64(info.maxPayload), func(o, l int64) error {
		return c.logged(&call{typ: cmdTrim, off: uint64(o), length: uint32(l)})
	})
	if err == nil {
		c.maybeAutoFlush()
	}
	return err
}

// WriteZeroes zeroes [off, off+n) with NBD_CMD_WRITE_ZEROES (NO_HOLE unless
// blockdev.ZeroMayUnmap, FAST_ZERO for blockdev.ZeroFast), or with written zeroes when
// the server lacks the command.
func (c *Client) WriteZeroes(off, n int64, flags blockdev.ZeroFlags) error {
	if err := blockdev.CheckRange(off, n, c.size); err != nil {
		return err
	}
	info := c.currentInfo()
	if info.has(tflagReadOnly) {
		return blockdev.ErrReadOnly
	}
	if !info.has(tflagSendWriteZeroes) {
		if flags&blockdev.ZeroFast != 0 {
			return blockdev.ErrNotFast
		}
		return blockdev.WriteZeroBuffers(c, off, n)
	}
	var f uint16
	if flags&blockdev.ZeroMayUnmap == 0 {
		f |= cmdFlagNoHole
	}
	if flags&blockdev.ZeroFast != 0 {
		if !info.has(tflagSendFastZero) {
			return blockdev.ErrNotFast
		}
		f |= cmdFlagFastZero
	}
	if err := c.begin(); err != nil {
		return err
	}
	defer c.calls.Done()
	if err := c.aligned(info, off, n); err != nil {
		return err
	}
	err := pieces(off, n, int64(info.maxPayload), func(o, l int64) error {
		return c.logged(&call{typ: cmdWriteZeroes, flags: f, off: uint64(o), length: uint32(l)})
	})
	if err == nil {
		c.maybeAutoFlush()
	}
	return err
}

// Close waits for the calls in progress, disconnects cleanly (NBD_CMD_DISC) and
// releases the connections. It does not flush.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.state == stateClosed {
		c.mu.Unlock()
		return blockdev.ErrClosed
	}
	c.state = stateClosed
	close(c.closeCh)
	c.cond.Broadcast()
	c.mu.Unlock()
	c.calls.Wait()
	c.mu.Lock()
	conns := c.conns
	c.mu.Unlock()
	for _, cc := range conns {
		cc.disconnect()
	}
	c.bg.Wait()
	return nil
}
