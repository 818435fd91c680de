package nbd

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"reflect"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/proc"
)

// The writer rule: one writer per volume at a time, whatever export name, listener or
// connection it comes through (the package doc and docs/nbd.md say it for users).
//
// Each connection has a writer identity: the writer id that atrest's client presents
// with NBD_OPT_ATREST_CLIENT (one per Client, kept across its connections and
// reconnects); else, on a unix socket, the peer process (SO_PEERCRED's pid with the
// process start time, so that a reused pid is another writer); over TCP, the peer's IP
// address; else the connection alone. The first connection that enters transmission with
// write access to a volume makes its writer the holder; the hold ends when the holder's
// last connection to that volume has ended (after its requests ran). Another writer's
// connection is refused (an atrest client asking for write access: NBD_REP_ERR_POLICY)
// or gets read-only access (a client that presented no identity). A take-over ends the
// holder's connections gracefully, remembers the holder as taken over (it may not write
// to the volume again while this server runs) and makes the new writer the holder.

// VolumeID identifies a volume, whatever its export names: a UUID. The zero VolumeID
// is none.
type VolumeID [16]byte

// IsZero reports whether v is none.
func (v VolumeID) IsZero() bool { return v == VolumeID{} }

// String formats v as a UUID (8-4-4-4-12 hex digits), or "none".
func (v VolumeID) String() string {
	if v.IsZero() {
		return "none"
	}
	h := hex.EncodeToString(v[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

const (
	// holdGrace is how long a connection that finds its volume held by another writer
	// waits for the hold to end before it is refused or made read-only: a writer that
	// has just disconnected holds the volume until the server has read its disconnect
	// and finished its requests (and flushed after it), which takes a moment.
	holdGrace = 3 * time.Second
	// takeOverTimeout bounds the graceful end of the connections of a writer taken
	// over; those still open then are closed at once (requests already running on the
	// device finish first all the same).
	takeOverTimeout = 20 * time.Second
	// maxOusted bounds the writers remembered as taken over.
	maxOusted = 1024
)

// writerKind says how a connection's writer identity was established.
type writerKind uint8

const (
	writerAtrest  writerKind = iota + 1 // the writer id of NBD_OPT_ATREST_CLIENT
	writerProcess                       // unix socket peer: pid and process start time
	writerPeer                          // TCP peer: IP address
	writerConn                          // anything else: the connection alone
)

// writerKey is a writer identity.
type writerKey struct {
	kind writerKind
	id   [16]byte
}

// connWriter is the writer rule's view of one connection. Its handshake goroutine sets
// every field but hold, which is under Server.mu.
type connWriter struct {
	key       writerKey // zero until presented or resolved
	desc      string    // the writer, for people
	presented bool      // by NBD_OPT_ATREST_CLIENT
	readOnly  bool      // read-only intent: never a holder, always NBD_FLAG_READ_ONLY
	takeOver  bool
	hold      *volumeHold // the hold the connection counts in, if it has write access under the rule
}

// volumeHold is the hold of one writer on one volume.
type volumeHold struct {
	key      any    // the volume (see export.volumeKey)
	volume   string // the volume, for people
	holder   writerKey
	desc     string
	since    time.Time
	conns    map[*serverConn]struct{} // the holder's connections with write access
	released chan struct{}            // closed when the hold ends or is taken over
	drained  chan struct{}            // take-over: closed once the previous holder's connections ended
}

// oustRecord remembers a writer taken over.
type oustRecord struct {
	volumeKey any
	volume    string
	by        string
	at        time.Time
}

// writerState is the Server's part of the writer rule, under Server.mu.
type writerState struct {
	holds  map[any]*volumeHold
	ousted map[writerKey]oustRecord
	order  []writerKey // of ousted, oldest first
	seq    uint64      // numbers writerConn identities
}

func newWriterState() writerState {
	return writerState{holds: make(map[any]*volumeHold), ousted: make(map[writerKey]oustRecord)}
}

// volumeKey is what the writer rule counts as one volume: the VolumeID, else the
// device, else (a device that cannot be a map key) the export alone.
func (e *export) volumeKey() any {
	if !e.VolumeID.IsZero() {
		return e.VolumeID
	}
	if reflect.ValueOf(e.Device).Comparable() {
		return e.Device
	}
	return e
}

// volumeName names the volume of e for people.
func (e *export) volumeName() string {
	if !e.VolumeID.IsZero() {
		return fmt.Sprintf("volume %s (export %q)", e.VolumeID, e.Name)
	}
	return fmt.Sprintf("the volume of export %q", e.Name)
}

// sameDevice reports whether a and b are the same device.
func sameDevice(a, b blockdev.Device) bool {
	return reflect.ValueOf(a).Comparable() && reflect.ValueOf(b).Comparable() && a == b
}

// parseAtrestClient validates the data of NBD_OPT_ATREST_CLIENT; problem says what is
// wrong with it.
func parseAtrestClient(data []byte) (id [16]byte, flags uint32, desc string, problem string) {
	switch {
	case len(data) < atrestClientFixedLen:
		return id, 0, "", fmt.Sprintf("NBD_OPT_ATREST_CLIENT data shorter than %d bytes", atrestClientFixedLen)
	case len(data) > atrestClientFixedLen+maxWriterDescription:
		return id, 0, "", fmt.Sprintf("NBD_OPT_ATREST_CLIENT description longer than %d bytes", maxWriterDescription)
	}
	copy(id[:], data)
	flags = binary.BigEndian.Uint32(data[writerIDLen:])
	desc = string(data[atrestClientFixedLen:])
	switch {
	case id == [16]byte{}:
		return id, 0, "", "NBD_OPT_ATREST_CLIENT writer id of zeros"
	case flags&^atrestClientFlags != 0:
		return id, 0, "", fmt.Sprintf("NBD_OPT_ATREST_CLIENT flags %#x unknown", flags&^atrestClientFlags)
	case flags&atrestClientReadOnly != 0 && flags&atrestClientTakeOver != 0:
		return id, 0, "", "NBD_OPT_ATREST_CLIENT with both read-only intent and take-over"
	case !printable(desc):
		return id, 0, "", "NBD_OPT_ATREST_CLIENT description is not printable UTF-8"
	}
	return id, flags, desc, ""
}

// printable reports whether s is valid UTF-8 without control characters.
func printable(s string) bool {
	return utf8.ValidString(s) && strings.IndexFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) < 0
}

// atrestClient answers NBD_OPT_ATREST_CLIENT: the connection's writer identity.
func (h *optionPhase) atrestClient(data []byte) error {
	const opt = optAtrestClient
	w := &h.c.writer
	if w.presented {
		return h.reply(opt, repErrInvalid, []byte("NBD_OPT_ATREST_CLIENT sent twice"))
	}
	id, flags, desc, problem := parseAtrestClient(data)
	if problem != "" {
		return h.reply(opt, repErrInvalid, []byte(problem))
	}
	if desc == "" {
		desc = "an atrest client"
	}
	key := writerKey{kind: writerAtrest, id: id}
	if msg, ok := h.c.s.oustedMessage(key, desc); ok {
		// Taken over: whatever it still has to write must never land after the new
		// writer's writes. The refusal of the option tells atrest's client so for good.
		return h.reply(opt, repErrPolicy, []byte(msg))
	}
	*w = connWriter{
		key: key, desc: desc, presented: true,
		readOnly: flags&atrestClientReadOnly != 0, takeOver: flags&atrestClientTakeOver != 0,
	}
	return h.reply(opt, repAck, nil)
}

// oustedMessage says why writer k (described as desc) was taken over, if it was.
func (s *Server) oustedMessage(k writerKey, desc string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.writers.ousted[k]
	if !ok {
		return "", false
	}
	return r.message(desc), true
}

func (r oustRecord) message(desc string) string {
	return fmt.Sprintf("%s was taken over on %s by %s at %s: it may not write there again", desc, r.volume, r.by, r.at.UTC().Format(time.RFC3339))
}

// resolveWriter gives a connection that presented no identity its peer's.
func (s *Server) resolveWriter(c *serverConn) {
	w := &c.writer
	if w.key.kind != 0 {
		return
	}
	switch nc := c.nc.(type) {
	case *net.UnixConn:
		if pid, ok := peerPID(nc); ok {
			if start, _, err := proc.StartTime(pid); err == nil {
				binary.BigEndian.PutUint32(w.key.id[0:], uint32(pid))
				binary.BigEndian.PutUint64(w.key.id[4:], start)
				w.key.kind = writerProcess
				w.desc = fmt.Sprintf("pid %d (%s)", pid, proc.Comm(pid))
				return
			}
		}
	case *net.TCPConn:
		if a, ok := nc.RemoteAddr().(*net.TCPAddr); ok {
			copy(w.key.id[:], a.IP.To16())
			w.key.kind = writerPeer
			w.desc = "peer " + a.IP.String()
			return
		}
	}
	s.mu.Lock()
	s.writers.seq++
	n := s.writers.seq
	s.mu.Unlock()
	binary.BigEndian.PutUint64(w.key.id[:], n)
	w.key.kind = writerConn
	w.desc = fmt.Sprintf("connection %d from %v", n, c.nc.RemoteAddr())
}

// peerPID returns the pid of the process at the other end of a unix socket, as it was
// when it connected (SO_PEERCRED).
func peerPID(uc *net.UnixConn) (int, bool) {
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil || cerr != nil {
		return 0, false
	}
	return int(cred.Pid), cred.Pid > 0 // 0: a process this pid namespace does not see
}

// admission is the writer rule's answer to a connection asking for an export.
type admission struct {
	readOnly bool            // the connection gets NBD_FLAG_READ_ONLY
	refusal  string          // NBD_OPT_GO is refused with NBD_REP_ERR_POLICY and this message
	note     string          // a line for the log
	retry    <-chan struct{} // a conflict within holdGrace: closed when the hold ends
	stop     []*serverConn   // take-over: the previous holder's connections, to end
	drained  chan struct{}   // take-over: to close once stop have ended
	wait     <-chan struct{} // a take-over by this writer is under way: wait for it
}

// admit applies the writer rule to c asking for e. With commit (NBD_OPT_GO,
// NBD_OPT_EXPORT_NAME) c is attached to e and, with write access under the rule, to
// the volume's hold; ok is false if the server is closing or e was removed. Without
// commit (NBD_OPT_INFO) it only says what NBD_OPT_GO would get. Unless final, a
// conflict with another writer returns retry and decides nothing.
func (s *Server) admit(c *serverConn, e *export, commit, final bool) (a admission, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if commit && (s.closing || e.removed) {
		return admission{}, false
	}
	if commit && s.transmitting >= s.cfg.MaxConns {
		s.log.Warn("nbd: refusing a connection: too many connections", "export", e.Name, "peer", c.nc.RemoteAddr(), "max_conns", s.cfg.MaxConns)
		return admission{}, false
	}
	w := &c.writer
	a.readOnly = w.readOnly
	var h *volumeHold
	if !e.ReadOnly && !e.SharedWriters && !w.readOnly {
		key := e.volumeKey()
		cur := s.writers.holds[key]
		rec, ousted := s.writers.ousted[w.key]
		switch {
		case ousted && rec.volumeKey == key && !w.takeOver:
			if w.presented {
				a.refusal = rec.message(w.desc)
			} else {
				a.readOnly = true
				a.note = fmt.Sprintf("nbd: %s gets read-only access to %s: %s", w.desc, e.volumeName(), rec.message(w.desc))
			}
		case cur == nil:
			if commit {
				h = s.newHoldLocked(key, e, w)
				a.note = fmt.Sprintf("nbd: %s is the writer of %s", w.desc, e.volumeName())
			}
		case cur.holder == w.key:
			h = cur
			a.wait = cur.drained
		case w.takeOver:
			if commit {
				h, a.stop = s.takeOverLocked(cur, key, e, w)
				a.drained = h.drained
				a.note = fmt.Sprintf("nbd: %s takes %s over from %s (writer since %s): ending its %d connection(s)",
					w.desc, e.volumeName(), cur.desc, cur.since.UTC().Format(time.RFC3339), len(a.stop))
			}
		case !final:
			return admission{retry: cur.released}, true
		case w.presented:
			a.refusal = fmt.Sprintf("%s is held by %s since %s: one writer per volume", e.volumeName(), cur.desc, cur.since.UTC().Format(time.RFC3339))
		default:
			a.readOnly = true
			a.note = fmt.Sprintf("nbd: %s gets read-only access to %s: it is held by %s since %s (one writer per volume)",
				w.desc, e.volumeName(), cur.desc, cur.since.UTC().Format(time.RFC3339))
		}
	}
	if commit && a.refusal == "" {
		s.endHandshakeLocked(c)
		s.transmitting++
		e.conns[c] = struct{}{}
		c.exp = e
		if h != nil {
			h.conns[c] = struct{}{}
			w.hold = h
		}
	}
	return a, true
}

func (s *Server) newHoldLocked(key any, e *export, w *connWriter) *volumeHold {
	h := &volumeHold{
		key: key, volume: e.volumeName(), holder: w.key, desc: w.desc, since: time.Now(),
		conns: make(map[*serverConn]struct{}), released: make(chan struct{}),
	}
	s.writers.holds[key] = h
	return h
}

// takeOverLocked makes w the holder of the volume that old holds and returns the new
// hold and old's connections, which the caller ends.
func (s *Server) takeOverLocked(old *volumeHold, key any, e *export, w *connWriter) (*volumeHold, []*serverConn) {
	stop := make([]*serverConn, 0, len(old.conns))
	for c := range old.conns {
		stop = append(stop, c)
	}
	s.oustLocked(old.holder, oustRecord{volumeKey: key, volume: old.volume, by: w.desc, at: time.Now()})
	close(old.released)
	h := s.newHoldLocked(key, e, w)
	h.drained = make(chan struct{})
	return h, stop
}

// oustLocked remembers writer k as taken over; the oldest record goes beyond maxOusted.
func (s *Server) oustLocked(k writerKey, r oustRecord) {
	ws := &s.writers
	if _, ok := ws.ousted[k]; !ok {
		ws.order = append(ws.order, k)
	}
	ws.ousted[k] = r
	if len(ws.order) > maxOusted {
		delete(ws.ousted, ws.order[0])
		ws.order = ws.order[1:]
	}
}

// releaseWriter takes an ended connection off its hold; the hold ends with the
// holder's last connection to the volume. The connection's requests have all run.
func (s *Server) releaseWriter(c *serverConn) {
	s.mu.Lock()
	h := c.writer.hold
	if h == nil {
		s.mu.Unlock()
		return
	}
	c.writer.hold = nil
	delete(h.conns, c)
	ended := len(h.conns) == 0 && s.writers.holds[h.key] == h
	if ended {
		delete(s.writers.holds, h.key)
		close(h.released)
	}
	s.mu.Unlock()
	if ended {
		s.log.Info(fmt.Sprintf("nbd: %s is no longer the writer of %s", h.desc, h.volume))
	}
}

// enter applies the writer rule to c entering transmission on e (NBD_OPT_GO,
// NBD_OPT_EXPORT_NAME): it waits up to holdGrace for a conflicting hold to end, attaches
// c unless refused, ends the connections of a writer it takes over, and waits for a
// take-over by its own writer to finish, so that no request of the previous writer
// runs after the first of the new one. ok is false if the server is closing or e was
// removed.
func (c *serverConn) enter(e *export) (a admission, ok bool) {
	s := c.s
	s.resolveWriter(c)
	deadline := time.Now().Add(holdGrace)
	for {
		final := !time.Now().Before(deadline) || c.ctx.Err() != nil
		a, ok = s.admit(c, e, true, final)
		if !ok || a.retry == nil {
			break
		}
		t := time.NewTimer(time.Until(deadline))
		select {
		case <-a.retry:
		case <-t.C:
		case <-c.ctx.Done():
		}
		t.Stop()
	}
	if a.note != "" {
		s.log.Info(a.note)
	}
	if a.stop != nil {
		ctx, cancel := context.WithTimeout(context.Background(), takeOverTimeout)
		if err := s.stopConns(ctx, a.stop); err != nil {
			s.log.Warn(fmt.Sprintf("nbd: take-over of %s: the previous writer's connections did not end in time; closed them", e.volumeName()), "timeout", takeOverTimeout)
		}
		cancel()
		close(a.drained)
	}
	if a.wait != nil {
		select {
		case <-a.wait:
		case <-c.ctx.Done():
		}
	}
	return a, ok
}

// keepAlive makes a TCP peer that vanished without a word (power cut, pulled cable,
// crashed host) end its connections, and so its hold on a volume, within about a
// minute: keepalive probes after 15 s idle, every 5 s; TCP_USER_TIMEOUT closes the
// connection once data or probes have gone unacknowledged for 60 s. The kernel's
// defaults would take two hours idle, about 15 minutes with data in flight.
func keepAlive(nc net.Conn) {
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return
	}
	_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 9})
	if raw, err := tc.SyscallConn(); err == nil {
		_ = raw.Control(func(fd uintptr) {
			_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(tcpUserTimeout/time.Millisecond))
		})
	}
}

const tcpUserTimeout = 60 * time.Second
