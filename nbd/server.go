package nbd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"reflect"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// ServerConfig sets the limits of a Server. The zero value is usable: every zero field
// takes the default named in its comment.
type ServerConfig struct {
	// MaxRequestSize is the largest READ or WRITE payload, advertised as the maximum
	// payload size of NBD_INFO_BLOCK_SIZE (default 32 MiB, the size every client may use
	// without asking). TRIM, WRITE_ZEROES and CACHE carry no payload and are not bounded.
	MaxRequestSize int
	// MaxConnBytes and MaxConnRequests bound the payload bytes (request and reply
	// buffers) and the requests (one worker goroutine each) in flight on one connection
	// (defaults 128 MiB, at least MaxRequestSize, and 128, what Linux's nbd client sends
	// at most). Of those, 1 MiB and 16 requests are the connection's own reserve, which
	// other clients cannot take; beyond it, a connection borrows from a pool that all
	// share, of MaxTotalBytes (default 512 MiB, at least MaxConnBytes) and
	// MaxTotalRequests (default 1024, at least MaxConnRequests). So in all, at most
	// MaxTotalBytes + MaxConns MiB are in flight (768 MiB with the defaults).
	MaxConnBytes     int64
	MaxTotalBytes    int64
	MaxConnRequests  int
	MaxTotalRequests int
	// WriteTimeout drops a connection whose client has taken none of its replies for
	// that long (default 30 s; detected within twice that), which frees what they held.
	WriteTimeout time.Duration
	// MaxConns bounds the connections in transmission (default 256); a client that
	// selects an export beyond it is refused (NBD_REP_ERR_SHUTDOWN, or a disconnect after
	// NBD_OPT_EXPORT_NAME).
	MaxConns int
	// MaxHandshakes bounds the connections in their handshake, counted apart from
	// MaxConns (default 64), and MaxPeerHandshakes those from one IP address over TCP
	// (default 8). A new connection beyond a bound is admitted by closing the handshake
	// (of that address, for the second) whose client has been silent the longest, so
	// that idle connections cannot lock a client out: one that completes its handshake
	// in milliseconds always gets in.
	MaxHandshakes     int
	MaxPeerHandshakes int
	// HandshakeTimeout bounds the whole option phase of a connection (default 30 s); the
	// first option must come within 10 s (or HandshakeTimeout, if shorter).
	HandshakeTimeout time.Duration
	// MaxOptions bounds the options one connection may send before transmission
	// (default 64); a client that sends more is disconnected.
	MaxOptions int
	// Ready, if set, is called by Serve once it accepts connections on its listener.
	// `atrest serve` uses it to tell systemd READY=1 once every listener is served.
	Ready func(addr net.Addr)
	// Logger receives one record per notable event (a connection refused, a device
	// error answered with EIO, a failed flush, a change of a volume's writer), with the
	// export, peer and error as attributes. Nil discards them: the package never prints
	// by itself.
	Logger *slog.Logger
}

// maxOptionLen bounds the data of one option. The largest legal option is NBD_OPT_GO
// with a 4096-byte name and every information request (4 + 4096 + 2 + 2*65535 bytes);
// anything larger is a denial of service ("Termination of the session during option
// haggling" allows a hard disconnect then).
const maxOptionLen = 4 + maxStringLen + 2 + 2*65535

func (c *ServerConfig) withDefaults() ServerConfig {
	d := *c
	if d.Logger == nil {
		d.Logger = discardLogger
	}
	if d.MaxRequestSize <= 0 {
		d.MaxRequestSize = 32 << 20
	}
	if d.MaxConnBytes <= 0 {
		d.MaxConnBytes = 128 << 20
	}
	d.MaxConnBytes = max(d.MaxConnBytes, int64(d.MaxRequestSize))
	if d.MaxTotalBytes <= 0 {
		d.MaxTotalBytes = 512 << 20
	}
	d.MaxTotalBytes = max(d.MaxTotalBytes, d.MaxConnBytes)
	if d.MaxConnRequests <= 0 {
		d.MaxConnRequests = 128
	}
	if d.MaxTotalRequests <= 0 {
		d.MaxTotalRequests = 1024
	}
	d.MaxTotalRequests = max(d.MaxTotalRequests, d.MaxConnRequests)
	if d.WriteTimeout <= 0 {
		d.WriteTimeout = 30 * time.Second
	}
	if d.MaxConns <= 0 {
		d.MaxConns = 256
	}
	if d.MaxHandshakes <= 0 {
		d.MaxHandshakes = 64
	}
	if d.MaxPeerHandshakes <= 0 {
		d.MaxPeerHandshakes = 8
	}
	if d.HandshakeTimeout <= 0 {
		d.HandshakeTimeout = 30 * time.Second
	}
	if d.MaxOptions <= 0 {
		d.MaxOptions = 64
	}
	return d
}

// Export is one device offered by a Server under a name. What it offers follows the
// Device's blockdev.Caps, asked at each handshake: trims (NBD_FLAG_SEND_TRIM) exactly
// where the Caps say Trim, so the Device decides (blockcrypt allows them only where the
// drive's header does).
type Export struct {
	// Name is what clients ask for; "" is the default export.
	Name string
	// Description is shown to people by clients (NBD_OPT_LIST, NBD_INFO_DESCRIPTION).
	Description string
	// Device is served; the Server never closes it. Every Device in the project is safe
	// for concurrent use, which the server relies on (one goroutine per request).
	Device blockdev.Device
	// ReadOnly exports refuse every change with EPERM and advertise NBD_FLAG_READ_ONLY,
	// also over a writable Device (a Device whose Caps say ReadOnly is exported
	// read-only anyway).
	ReadOnly bool
	// Rotational sets NBD_FLAG_ROTATIONAL, a scheduling hint for clients.
	Rotational bool
	// VolumeID identifies the volume whatever its export names (atrest serve: the
	// volume UUID of the drive's atrest token). It is advertised to clients that ask for
	// it (NBD_INFO_ATREST_VOLUME, docs/nbd.md), which pin it, and it keys the writer
	// rule: exports with the same VolumeID are one volume and must serve the same
	// Device. Zero: none; the writer rule then keys the volume by its Device.
	VolumeID VolumeID
	// SharedWriters turns the writer rule off for this export: every connection may
	// write, whoever else does. Dangerous for ext4 and any file system that is not
	// made for several writers; for benchmarks with several independent clients and
	// for clients that coordinate themselves (cluster file systems).
	SharedWriters bool
}

// export is an Export being served, with the connections that use it.
type export struct {
	Export
	preferred uint32
	conns     map[*serverConn]struct{}
	removed   bool
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("nbd server closed")

// Server serves blockdev.Devices over NBD. All its methods are safe for concurrent use.
type Server struct {
	cfg ServerConfig
	log *slog.Logger // cfg.Logger, never nil

	pool       *pool         // payload bytes and requests beyond the connections' reserves
	writeCheck time.Duration // the write watch's period (see serverConn.writeOut)
	clock      time.Time     // origin of serverConn.active

	mu           sync.Mutex
	exports      map[string]*export
	listeners    map[net.Listener]struct{}
	conns        map[*serverConn]struct{}
	handshakes   map[*serverConn]struct{} // conns in their handshake
	peers        map[string]int           // handshakes per TCP peer address
	transmitting int                      // conns attached to an export
	accepted     uint64
	closing      bool
	connsWG      sync.WaitGroup
	writeTimer   *time.Timer // runs watchWrites
	writeWatch   bool        // writeTimer is pending or running
	evictLog     time.Time   // when the last eviction was logged
	evicted      int         // evictions since then, not logged
	writers      writerState // the writer rule (writer.go), under mu

	// watchOff is set while no watchdog runs (see watch).
	watchOff atomic.Bool
}

// discardLogger stands for a nil Logger.
var discardLogger = slog.New(slog.DiscardHandler)

// NewServer returns a Server with no exports.
func NewServer(cfg ServerConfig) *Server {
	cfg = cfg.withDefaults()
	s := &Server{
		cfg:        cfg,
		log:        cfg.Logger,
		pool:       newPool(cfg.MaxTotalBytes, int64(cfg.MaxTotalRequests)),
		writeCheck: cfg.WriteTimeout / 4,
		clock:      time.Now(),
		exports:    make(map[string]*export),
		listeners:  make(map[net.Listener]struct{}),
		conns:      make(map[*serverConn]struct{}),
		handshakes: make(map[*serverConn]struct{}),
		peers:      make(map[string]int),
		writers:    newWriterState(),
	}
	s.watchOff.Store(true)
	return s
}

// watchLinger is how long the watchdog goes on looking after the last inline request.
const watchLinger = 200 * time.Millisecond

// watchInline is called by each inline request once it has made its connection's role
// odd: it starts the watchdog if none runs.
func (s *Server) watchInline() {
	if s.watchOff.Load() && s.watchOff.CompareAndSwap(true, false) {
		go s.watch()
	}
}

// watch is the watchdog of inline requests (see inlineMax): every rescueDelay it looks
// at the reader role of every connection and takes it over (serverConn.takeOver) from a
// connection that has been running the same request inline since its last look. It
// exits after watchLinger without an inline request; the next one starts it again.
func (s *Server) watch() {
	var conns []*serverConn
	snapshot := func() {
		s.mu.Lock()
		for c := range s.conns {
			conns = append(conns, c)
		}
		s.mu.Unlock()
	}
	quiet := time.Duration(0)
	for {
		time.Sleep(rescueDelay)
		snapshot()
		active := false
		for _, c := range conns {
			v := c.role.Load()
			if v != c.watchSeen {
				active = true
			} else if v%2 == 1 {
				c.takeOver(v)
			}
			c.watchSeen = v
		}
		clear(conns)
		conns = conns[:0]
		if active {
			quiet = 0
			continue
		}
		if quiet += rescueDelay; quiet < watchLinger {
			continue
		}
		// Stop, unless an inline request started before watchInline could see the flag
		// (role made odd first, flag set first: one of the two sees the other).
		s.watchOff.Store(true)
		snapshot()
		running := false
		for _, c := range conns {
			running = running || c.role.Load()%2 == 1
		}
		clear(conns)
		conns = conns[:0]
		if !running || !s.watchOff.CompareAndSwap(true, false) {
			return
		}
		quiet = 0
	}
}

// AddExport offers e to new connections. The name must be unique and at most 4096 bytes.
func (s *Server) AddExport(e Export) error {
	if e.Device == nil {
		return fmt.Errorf("export %q: no device", e.Name)
	}
	if len(e.Name) > maxStringLen || len(e.Description) > maxStringLen {
		return fmt.Errorf("export %q: name or description longer than %d bytes", e.Name, maxStringLen)
	}
	if e.Device.Size() < 0 {
		return fmt.Errorf("export %q: negative device size", e.Name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return ErrServerClosed
	}
	if _, ok := s.exports[e.Name]; ok {
		return fmt.Errorf("export %q already exists", e.Name)
	}
	for _, o := range s.exports {
		if !e.VolumeID.IsZero() && o.VolumeID == e.VolumeID && !sameDevice(o.Device, e.Device) {
			return fmt.Errorf("export %q: volume %s is already exported as %q from another device", e.Name, e.VolumeID, o.Name)
		}
	}
	s.exports[e.Name] = &export{Export: e, preferred: preferredBlockSize(e.Device), conns: make(map[*serverConn]struct{})}
	return nil
}

// preferredBlockSize is the device's preferred size made legal for NBD_INFO_BLOCK_SIZE:
// a power of two, at least 512 ("Size constraints"), at most 32 MiB.
func preferredBlockSize(d blockdev.Device) uint32 {
	p := blockdev.PreferredBlockSize(d)
	v := uint32(512)
	for v < uint32(p) && v < 32<<20 {
		v <<= 1
	}
	return v
}

// RemoveExport stops offering the named export, then ends its connections gracefully:
// each stops reading requests, answers those in flight, flushes the device and closes.
// When ctx ends first, the remaining connections are closed at once. The device is
// not closed.
func (s *Server) RemoveExport(ctx context.Context, name string) error {
	s.mu.Lock()
	e, ok := s.exports[name]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("export %q does not exist", name)
	}
	delete(s.exports, name)
	e.removed = true
	conns := make([]*serverConn, 0, len(e.conns))
	for c := range e.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	return s.stopConns(ctx, conns)
}

// Connections returns how many connections use the named export now (0 for an export
// that does not exist).
func (s *Server) Connections(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.exports[name]; ok {
		return len(e.conns)
	}
	return 0
}

// ServerStats are counters of a Server, for status lines and tests.
type ServerStats struct {
	Connections int    // open now, handshakes included
	Handshakes  int    // open now and in their handshake
	Accepted    uint64 // since NewServer
	// Requests in flight and their payload bytes, and what of them is borrowed from
	// the pool that the connections share (see ServerConfig.MaxConnBytes).
	Requests, Bytes         int64
	PoolRequests, PoolBytes int64
}

// Stats returns the server's counters.
func (s *Server) Stats() ServerStats {
	s.mu.Lock()
	st := ServerStats{Connections: len(s.conns), Handshakes: len(s.handshakes), Accepted: s.accepted}
	for c := range s.conns {
		bytes, reqs := c.budget.inReserve()
		st.Bytes += bytes
		st.Requests += reqs
	}
	s.mu.Unlock()
	st.PoolBytes, st.PoolRequests = s.pool.inUse()
	st.Bytes += st.PoolBytes
	st.Requests += st.PoolRequests
	return st
}

// Exports returns the names of the exports, sorted.
func (s *Server) Exports() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, 0, len(s.exports))
	for n := range s.exports {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// lookup returns the export for a handshake, or nil.
func (s *Server) lookup(name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exports[name]
}

// listExports returns a snapshot for NBD_OPT_LIST.
func (s *Server) listExports() []Export {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Export, 0, len(s.exports))
	for _, e := range s.exports {
		out = append(out, e.Export)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// Serve accepts connections on l and serves each in its own goroutines until Shutdown
// or Close, when it returns ErrServerClosed, or until ctx ends, when it closes l and
// the connections it accepted at once (requests in flight still finish on the device)
// and returns ctx.Err(). Serve closes l when it returns. Call it once per listener.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()

	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(lctx, func() { l.Close() })
	defer stop()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()

	if s.cfg.Ready != nil {
		s.cfg.Ready(l.Addr())
	}
	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.isClosing() {
				return ErrServerClosed
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Temporary (out of file descriptors): back off like net/http.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("nbd: accept failed; retrying", "listener", l.Addr(), "err", err, "delay", delay)
				select {
				case <-time.After(delay):
				case <-lctx.Done():
				}
				continue
			}
			return fmt.Errorf("accept on %s: %w", l.Addr(), err)
		}
		delay = 0
		s.startConn(ctx, nc) // not lctx: Serve returning after Shutdown must not cut the drain
	}
}

// ServeConn serves one already-connected client (an inetd-style socket, or one end of
// net.Pipe in tests) and returns when the connection ends.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) {
	c := s.startConn(ctx, nc)
	if c != nil {
		<-c.done
	}
}

func (s *Server) startConn(ctx context.Context, nc net.Conn) *serverConn {
	c := newServerConn(s, nc)
	if a, ok := nc.RemoteAddr().(*net.TCPAddr); ok {
		c.peer = a.IP.String()
	}
	c.touch()
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		nc.Close()
		return nil
	}
	s.admitLocked(c)
	s.conns[c] = struct{}{}
	s.accepted++
	s.connsWG.Add(1)
	if !s.writeWatch {
		s.writeWatch = true
		if s.writeTimer == nil {
			s.writeTimer = time.AfterFunc(s.writeCheck, s.watchWrites)
		} else {
			s.writeTimer.Reset(s.writeCheck)
		}
	}
	s.mu.Unlock()
	go func() {
		defer s.connsWG.Done()
		defer close(c.done)
		stop := context.AfterFunc(ctx, c.forceClose)
		defer stop()
		c.serve()
		s.mu.Lock()
		delete(s.conns, c)
		if c.exp != nil {
			delete(c.exp.conns, c)
			s.transmitting--
		}
		s.mu.Unlock()
		s.releaseWriter(c)
	}()
	return c
}

// admitLocked counts c as a handshake in progress, first closing the handshake whose
// client has been silent the longest, among those from c's address when that has
// MaxPeerHandshakes, and among all when there are MaxHandshakes. s.mu is held.
func (s *Server) admitLocked(c *serverConn) {
	if c.peer != "" && s.peers[c.peer] >= s.cfg.MaxPeerHandshakes {
		s.evictLocked(c.peer)
	}
	if len(s.handshakes) >= s.cfg.MaxHandshakes {
		s.evictLocked("")
	}
	s.handshakes[c] = struct{}{}
	if c.peer != "" {
		s.peers[c.peer]++
	}
}

// evictLocked closes the handshake, of peer or of any client when peer is "", that has
// made no progress for the longest time. s.mu is held.
func (s *Server) evictLocked(peer string) {
	var victim *serverConn
	for c := range s.handshakes {
		if peer != "" && c.peer != peer {
			continue
		}
		if victim == nil || c.active.Load() < victim.active.Load() {
			victim = c
		}
	}
	if victim == nil {
		panic("BUG: no handshake to close although the count is at its bound")
	}
	s.endHandshakeLocked(victim)
	victim.forceClose()
	s.evicted++
	if now := time.Now(); now.Sub(s.evictLog) >= time.Second {
		idle := now.Sub(s.clock) - time.Duration(victim.active.Load())
		s.log.Warn(fmt.Sprintf("nbd: closed %d handshake(s) to admit new connections", s.evicted),
			"peer", victim.nc.RemoteAddr(), "silent", idle.Round(time.Millisecond),
			"max_handshakes", s.cfg.MaxHandshakes, "max_peer_handshakes", s.cfg.MaxPeerHandshakes)
		s.evictLog, s.evicted = now, 0
	}
}

// endHandshake stops counting c as a handshake in progress.
func (s *Server) endHandshake(c *serverConn) {
	s.mu.Lock()
	s.endHandshakeLocked(c)
	s.mu.Unlock()
}

func (s *Server) endHandshakeLocked(c *serverConn) {
	if _, ok := s.handshakes[c]; !ok {
		return
	}
	delete(s.handshakes, c)
	if c.peer != "" {
		if s.peers[c.peer]--; s.peers[c.peer] == 0 {
			delete(s.peers, c.peer)
		}
	}
}

// touch records progress of c's handshake (see evictLocked).
func (c *serverConn) touch() {
	c.active.Store(int64(time.Since(c.s.clock)))
}

// watchWrites is the write watch (see serverConn.writeOut): every writeCheck while
// the server has connections, it looks at each connection's writer.
func (s *Server) watchWrites() {
	s.mu.Lock() // also orders the looks of successive runs (serverConn.wseen)
	conns := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.checkWrite()
	}
	s.mu.Lock()
	if len(s.conns) > 0 {
		s.writeTimer.Reset(s.writeCheck)
	} else {
		s.writeWatch = false
	}
	s.mu.Unlock()
}

// stopConns ends the connections gracefully and waits, closing them at once if ctx
// ends first.
func (s *Server) stopConns(ctx context.Context, conns []*serverConn) error {
	for _, c := range conns {
		c.gracefulStop()
	}
	var err error
	for _, c := range conns {
		select {
		case <-c.done:
		case <-ctx.Done():
			err = ctx.Err()
			for _, c := range conns {
				c.forceClose()
			}
			for _, c := range conns {
				<-c.done
			}
			return err
		}
	}
	return nil
}

// Shutdown stops the server gracefully: it closes the listeners, lets every connection
// answer the requests it has read (connections still in their handshake are closed),
// flushes every export's device (once, when exports share it) and returns. When ctx
// ends before the connections are done, they are closed at once; the devices are
// flushed all the same. The devices are not closed. Shutdown returns the flush errors and ctx's error, if any.
func (s *Server) Shutdown(ctx context.Context) error {
	return s.shutdown(ctx, true)
}

func (s *Server) shutdown(ctx context.Context, reportCtx bool) error {
	s.mu.Lock()
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	conns := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	exports := make([]*export, 0, len(s.exports))
	for _, e := range s.exports {
		exports = append(exports, e)
	}
	s.mu.Unlock()

	var errs []error
	if err := s.stopConns(ctx, conns); err != nil && reportCtx {
		errs = append(errs, err)
	}
	s.connsWG.Wait()
	s.mu.Lock()
	if s.writeTimer != nil && s.writeTimer.Stop() {
		s.writeWatch = false
	}
	s.mu.Unlock()
	// Flush each device once: several exports may serve the same one (`atrest serve`
	// offers a lone volume under its name and as the default export). Names in reverse
	// order put the default export last, so a failed flush is reported under a real name.
	sort.Slice(exports, func(i, j int) bool { return exports[i].Name > exports[j].Name })
	flushed := make(map[blockdev.Device]bool, len(exports))
	for _, e := range exports {
		if reflect.ValueOf(e.Device).Comparable() {
			if flushed[e.Device] {
				continue
			}
			flushed[e.Device] = true
		}
		if err := e.Device.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush export %q: %w", e.Name, err))
		}
	}
	return errors.Join(errs...)
}

// Close closes the listeners and every connection at once, without draining, then
// flushes the exports like Shutdown.
func (s *Server) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return s.shutdown(ctx, false)
}
