package slot

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
)

// Config configures a Slot.
type Config struct {
	// Path is where the drive was opened (for probes, messages, State).
	Path string
	// Open opens the drive at a path (the node's: exclusive, O_DIRECT as it serves).
	// Reinsert uses it.
	Open func(path string) (blockdev.Device, error)
	// MissingTimeout bounds how long a request waits for a missing drive (measured from
	// the moment the drive went missing); 0 means DefaultMissingTimeout; negative: do
	// not wait (fail at once).
	MissingTimeout time.Duration
	// LogLimit bounds the bytes of written-but-not-flushed data kept for replay; 0
	// means DefaultLogLimit; negative disables the log: every change is then made
	// durable before it is answered (a write becomes a write and a Flush of the drive,
	// which is slow).
	LogLimit int64
	// ProbeTimeout bounds a probe; 0 means DefaultProbeTimeout. A probe that times out
	// counts as failed (gone).
	ProbeTimeout time.Duration
	// Notify, if set, is called after every change of State (presence, TimedOut), in
	// order, from one goroutine at a time, never under the Slot's locks: it may call
	// the Slot. It runs on the goroutine of whatever made the change (often a request
	// that found the drive gone), so it should return quickly.
	Notify func(State)
	// Logger gets a line per state change and per medium error; nil discards.
	Logger *slog.Logger
}

const (
	// DefaultMissingTimeout is how long requests wait for a missing drive by default.
	DefaultMissingTimeout = 120 * time.Second
	// DefaultLogLimit bounds the replay log by default.
	DefaultLogLimit = 64 << 20
	// DefaultProbeTimeout bounds a probe by default.
	DefaultProbeTimeout = 2 * time.Second
)

// Presence says whether a drive is in the slot.
type Presence string

const (
	// Present: the drive is in the slot and requests run on it.
	Present Presence = "present"
	// Missing: the drive is out; requests wait for it (see State.TimedOut).
	Missing Presence = "missing"
	// Closed: the slot is closed; requests fail with blockdev.ErrClosed.
	Closed Presence = "closed"
)

// State is what a Slot says about itself.
type State struct {
	Presence Presence
	// Path is where the drive is (present) or was last (missing).
	Path string
	// Since is when the drive became present (New, Reinsert) or missing, or when the
	// slot was closed.
	Since time.Time
	// Reason says why the drive is missing: "pulled by the operator", the failed I/O
	// and probe, ...
	Reason string
	// Returned is set once a drive came back: when, and at which path (kept while
	// present).
	Returned     time.Time
	ReturnedPath string
	// Generation counts drive changes: 1 at New, +1 at each missing and each reinsert.
	Generation uint64
	// Unflushed is the number of bytes of data in the replay log now.
	Unflushed int64
	// TimedOut: missing for longer than MissingTimeout; requests fail at once with an
	// error of the class ErrMissing until Reinsert.
	TimedOut bool
}

// The errors of Pull and Reinsert, matched with errors.Is.
var (
	// ErrNotPresent: the slot holds no drive (Pull of a missing drive).
	ErrNotPresent = errors.New("no drive in the slot")
	// ErrPresent: the slot holds its drive already (Reinsert of a present drive).
	ErrPresent = errors.New("the drive is in the slot already")
	// ErrNotSameDrive: the drive offered to Reinsert is not the slot's: another UUID,
	// another data key (the drive was reformatted) or another size.
	ErrNotSameDrive = errors.New("not the drive of this slot")
	// ErrMissing: a request gave up on a missing drive. With a MissingTimeout of zero
	// or more (the request waited that long) the error is of the class
	// blockdev.ErrTimeout too, which the NBD server answers with EIO: the drive may
	// come back, but this request failed. With a negative MissingTimeout (a mirror's
	// member: it never waits) it is of the class blockdev.ErrGone, for the layer
	// above to fail the member out.
	ErrMissing = errors.New("drive missing")
)

// held is one drive in the slot, from the moment it was put in until it goes. A call
// remembers the held it ran on: its result counts only if that is still the slot's.
type held struct {
	dev  blockdev.Device
	gen  uint64
	path string
	node node // what path was when the drive was opened, for the probe
}

// Slot is the place of one drive in a volume: a blockdev.Device that holds the drive
// currently in it, or none, and outlives the drive (see the package doc). It is safe
// for concurrent use.
type Slot struct {
	id           Identity
	size         int64
	open         func(string) (blockdev.Device, error)
	timeout      time.Duration
	probeTimeout time.Duration
	notify       func(State)
	logger       *slog.Logger

	// cur is the drive in the slot, nil while it is missing and after Close: loaded
	// when a call starts and again when it returns, to see whether the drive it ran on
	// is still the slot's. It is changed only under both mu and lg.mu.
	cur atomic.Pointer[held]

	// lg is the replay log, empty when noLog; its mutex orders the appends and drops
	// against the changes of cur.
	lg    replayLog
	noLog bool
	limit int64
	// limitFlush is the token of the one flush that the log's limit asks for.
	limitFlush chan struct{}

	// opMu serializes Pull and Reinsert.
	opMu sync.Mutex

	mu      sync.Mutex
	st      State
	closed  bool
	changed chan struct{} // closed and replaced at every change of presence and TimedOut
	timer   *time.Timer   // the missing timeout of the current absence
	probing *probeCall    // the probe running now, shared by the calls that failed
	caps    blockdev.Caps // of the last drive put in, for Caps while missing
	// notes are the states not yet passed to notify; notifying is set while a
	// goroutine passes them.
	notes     []State
	notifying bool
}

// probeCall is one probe of a drive, shared by every call that failed on it meanwhile.
type probeCall struct {
	h    *held
	done chan struct{} // closed once err is set
	err  error
}

var (
	_ blockdev.Device       = (*Slot)(nil)
	_ blockdev.Trimmer      = (*Slot)(nil)
	_ blockdev.ZeroWriter   = (*Slot)(nil)
	_ blockdev.FUAWriter    = (*Slot)(nil)
	_ blockdev.BlockSizer   = (*Slot)(nil)
	_ blockdev.CapsReporter = (*Slot)(nil)
)

// New makes a Slot over dev, which is open at cfg.Path and which the Slot then owns
// (Close closes it). It reads dev's Identity; every drive put back later must have the
// same one. On an error dev stays the caller's.
func New(dev blockdev.Device, cfg Config) (*Slot, error) {
	id, err := Identify(dev)
	if err != nil {
		return nil, fmt.Errorf("drive at %s: %w", cfg.Path, err)
	}
	s := &Slot{
		id:           id,
		size:         dev.Size(),
		open:         cfg.Open,
		timeout:      cfg.MissingTimeout,
		probeTimeout: cfg.ProbeTimeout,
		notify:       cfg.Notify,
		logger:       cfg.Logger,
		limit:        cfg.LogLimit,
		limitFlush:   make(chan struct{}, 1),
		changed:      make(chan struct{}),
		caps:         blockdev.CapsOf(dev),
	}
	if s.timeout == 0 {
		s.timeout = DefaultMissingTimeout
	}
	if s.probeTimeout <= 0 {
		s.probeTimeout = DefaultProbeTimeout
	}
	switch {
	case s.limit == 0:
		s.limit = DefaultLogLimit
	case s.limit < 0:
		s.noLog = true
	}
	if s.logger == nil {
		s.logger = slog.New(slog.DiscardHandler)
	}
	s.logger = s.logger.With("drive", id.UUID)
	s.cur.Store(&held{dev: dev, gen: 1, path: cfg.Path, node: statNode(cfg.Path)})
	s.st = State{Presence: Present, Path: cfg.Path, Since: time.Now(), Generation: 1}
	return s, nil
}

// Identity returns the identity of the slot's drive.
func (s *Slot) Identity() Identity { return s.id }

// State returns the slot's state now.
func (s *Slot) State() State {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stateLocked()
}

// stateLocked is State. The caller holds mu.
func (s *Slot) stateLocked() State {
	st := s.st
	s.lg.mu.Lock()
	st.Unflushed = s.lg.bytes
	s.lg.mu.Unlock()
	return st
}

// Size returns the size of the slot's drive, the same for every drive put in.
func (s *Slot) Size() int64 { return s.size }

// Caps returns the capabilities of the drive in the slot, or of the last one while it
// is missing.
func (s *Slot) Caps() blockdev.Caps {
	if h := s.cur.Load(); h != nil {
		return blockdev.CapsOf(h.dev)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.caps
}

// PreferredBlockSize returns the drive's, or the last one's while it is missing.
func (s *Slot) PreferredBlockSize() int {
	if h := s.cur.Load(); h != nil {
		return blockdev.PreferredBlockSize(h.dev)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return max(s.caps.BlockSize, 512)
}

// acquire returns the drive in the slot, waiting while it is missing (see the package
// doc).
func (s *Slot) acquire() (*held, error) {
	if h := s.cur.Load(); h != nil {
		return h, nil
	}
	s.mu.Lock()
	for {
		if h := s.cur.Load(); h != nil {
			s.mu.Unlock()
			return h, nil
		}
		if s.closed {
			s.mu.Unlock()
			return nil, fmt.Errorf("drive %s: %w", s.id.UUID, blockdev.ErrClosed)
		}
		if s.st.TimedOut {
			err := s.missingErrLocked()
			s.mu.Unlock()
			return nil, err
		}
		ch := s.changed
		s.mu.Unlock()
		<-ch
		s.mu.Lock()
	}
}

// missingErrLocked is the error of a call that gave up waiting. The caller holds mu.
func (s *Slot) missingErrLocked() error {
	since := s.st.Since.Format(time.RFC3339)
	if s.timeout < 0 {
		return fmt.Errorf("drive %s (last at %s) is missing since %s: %w (%w)", s.id.UUID, s.st.Path, since,
			ErrMissing, blockdev.ErrGone)
	}
	return fmt.Errorf("drive %s (last at %s) is missing since %s, longer than the %v requests wait: %w (%w)",
		s.id.UUID, s.st.Path, since, s.timeout, ErrMissing, blockdev.ErrTimeout)
}

// failed decides what becomes of err, the error of a call (op, on [off, off+n)) that
// ran on h: redo the call (redo, when h is no longer the slot's drive or the probe
// finds it gone), or return err (reclassified when the probe finds the drive there).
func (s *Slot) failed(h *held, op string, off, n int64, err error) (redo bool, _ error) {
	if s.cur.Load() != h {
		return true, nil
	}
	if !errors.Is(err, blockdev.ErrGone) && !errors.Is(err, blockdev.ErrMedium) && !errors.Is(err, blockdev.ErrTimeout) {
		return false, err
	}
	what := fmt.Sprintf("%s at offset %d length %d", op, off, n)
	if op == opFlush {
		what = op
	}
	if s.probeShared(h, func(probeErr error) string {
		return fmt.Sprintf("%s failed (%v) and the probe failed: %v", what, err, probeErr)
	}) {
		return true, nil
	}
	s.logger.Warn("slot: medium error, the drive answers a probe", "path", h.path, "op", what, "err", err)
	if !errors.Is(err, blockdev.ErrMedium) && errors.Is(err, blockdev.ErrGone) {
		// The drive is there: whatever said it was gone, this request failed on it.
		err = fmt.Errorf("%s (but the drive answers a probe): %w", err.Error(), blockdev.ErrMedium)
	}
	return false, err
}

// probeShared probes h, or waits for the probe of h already running, and reports
// whether h is gone: it was no longer the slot's drive, or the probe failed, and then
// the slot marks it missing with the reason that reason makes of the probe's error.
func (s *Slot) probeShared(h *held, reason func(probeErr error) string) (gone bool) {
	s.mu.Lock()
	if s.cur.Load() != h {
		s.mu.Unlock()
		return true
	}
	if p := s.probing; p != nil && p.h == h {
		s.mu.Unlock()
		<-p.done
		return p.err != nil || s.cur.Load() != h
	}
	p := &probeCall{h: h, done: make(chan struct{})}
	s.probing = p
	s.mu.Unlock()

	p.err = s.probe(h)

	s.mu.Lock()
	if s.probing == p {
		s.probing = nil
	}
	close(p.done)
	if p.err != nil {
		s.goneLocked(h, reason(p.err))
	}
	gone = s.cur.Load() != h
	s.mu.Unlock()
	s.deliver()
	return gone
}

// goneLocked marks h missing, if it is still the slot's drive, and closes it on a
// goroutine of its own (a drive that stopped answering may hold its Close until its
// last call returns); the close's error comes on the channel. The caller holds mu.
func (s *Slot) goneLocked(h *held, reason string) (closed <-chan error, ok bool) {
	if s.cur.Load() != h {
		return nil, false
	}
	s.lg.mu.Lock()
	s.cur.Store(nil)
	s.lg.mu.Unlock()
	now := time.Now()
	s.st = State{
		Presence:   Missing,
		Path:       h.path,
		Since:      now,
		Reason:     reason,
		Generation: s.st.Generation + 1,
		TimedOut:   s.timeout < 0,
	}
	if s.timeout > 0 {
		gen := s.st.Generation
		s.timer = time.AfterFunc(s.timeout, func() { s.expire(gen) })
	}
	s.changedLocked()
	s.logger.Warn("slot: drive missing", "path", h.path, "reason", reason, "generation", s.st.Generation)
	done := make(chan error, 1)
	go func() {
		err := h.dev.Close()
		if err != nil {
			s.logger.Info("slot: closing the missing drive", "path", h.path, "err", err)
		}
		done <- err
	}()
	return done, true
}

// expire ends the wait for the drive that went missing at generation gen.
func (s *Slot) expire(gen uint64) {
	s.mu.Lock()
	if s.closed || s.cur.Load() != nil || s.st.Generation != gen || s.st.TimedOut {
		s.mu.Unlock()
		return
	}
	s.st.TimedOut = true
	s.changedLocked()
	s.logger.Warn("slot: drive missing longer than the missing timeout, requests fail", "path", s.st.Path,
		"since", s.st.Since, "timeout", s.timeout)
	s.mu.Unlock()
	s.deliver()
}

// changedLocked wakes the waiting calls and queues the state for Notify. The caller
// holds mu, and calls deliver once it released it.
func (s *Slot) changedLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
	if s.notify != nil {
		s.notes = append(s.notes, s.stateLocked())
	}
}

// deliver passes the queued states to Notify, in order, from one goroutine at a time
// (whichever finds none passing them), with no lock held. Callers call it after they
// released mu.
func (s *Slot) deliver() {
	if s.notify == nil {
		return
	}
	s.mu.Lock()
	if s.notifying {
		s.mu.Unlock()
		return
	}
	s.notifying = true
	for len(s.notes) > 0 {
		st := s.notes[0]
		s.notes = slices.Delete(s.notes, 0, 1)
		s.mu.Unlock()
		s.notify(st)
		s.mu.Lock()
	}
	s.notifying = false
	s.mu.Unlock()
}

// Names of the operations, in errors and reasons.
const (
	opRead  = "read"
	opWrite = "write"
	opFUA   = "FUA write"
	opZero  = "write zeroes"
	opTrim  = "trim"
	opFlush = "flush"
)

// ReadAt reads from the drive in the slot, waiting while it is missing.
func (s *Slot) ReadAt(p []byte, off int64) (int, error) {
	switch {
	case off < 0:
		return 0, fmt.Errorf("read drive %s: %w", s.id.UUID, blockdev.CheckRange(off, int64(len(p)), s.size))
	case off >= s.size && len(p) > 0:
		return 0, io.EOF
	case len(p) == 0:
		return 0, nil
	}
	for {
		h, err := s.acquire()
		if err != nil {
			return 0, err
		}
		n, err := h.dev.ReadAt(p, off)
		if err == nil || err == io.EOF {
			if s.cur.Load() != h {
				continue // read from a drive that is no longer in the slot
			}
			return n, err
		}
		if redo, err := s.failed(h, opRead, off, int64(len(p)), err); !redo {
			return n, err
		}
	}
}

// WriteAt writes to the drive in the slot, waiting while it is missing, and keeps a
// copy in the replay log until a Flush.
func (s *Slot) WriteAt(p []byte, off int64) (int, error) {
	if err := s.change(opWrite, p, off, int64(len(p)), 0); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAtFUA writes durably to the drive in the slot, waiting while it is missing.
func (s *Slot) WriteAtFUA(p []byte, off int64) (int, error) {
	if err := s.change(opFUA, p, off, int64(len(p)), 0); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteZeroes zeroes a range of the drive in the slot (blockdev.WriteZeroes), waiting
// while it is missing.
func (s *Slot) WriteZeroes(off, n int64, flags blockdev.ZeroFlags) error {
	return s.change(opZero, nil, off, n, flags)
}

// Trim trims a range of the drive in the slot (blockdev.Trim), waiting while it is
// missing.
func (s *Slot) Trim(off, n int64) error {
	return s.change(opTrim, nil, off, n, 0)
}

// change makes the change op (with p for writes, flags for zeroing) on the drive in
// the slot until a drive that is still in the slot answers it, then logs it for replay
// (or, without a log, flushes it before answering).
func (s *Slot) change(op string, p []byte, off, n int64, flags blockdev.ZeroFlags) error {
	if err := blockdev.CheckRange(off, n, s.size); err != nil {
		return fmt.Errorf("%s drive %s: %w", op, s.id.UUID, err)
	}
	var rec record // the copy of p, made once, owned by the log once appended
	defer func() { rec.release() }()
	for {
		h, err := s.acquire()
		if err != nil {
			return err
		}
		switch op {
		case opWrite:
			_, err = h.dev.WriteAt(p, off)
		case opFUA:
			_, err = blockdev.WriteFUA(h.dev, p, off)
		case opZero:
			err = blockdev.WriteZeroes(h.dev, off, n, flags)
		case opTrim:
			err = blockdev.Trim(h.dev, off, n)
		}
		if err == nil && s.noLog && op != opFUA {
			err = h.dev.Flush()
		}
		if err != nil {
			if redo, err := s.failed(h, op, off, n, err); !redo {
				return err
			}
			continue
		}
		if s.noLog || n == 0 {
			if s.cur.Load() != h {
				continue
			}
			return nil
		}
		if op == opWrite && rec.first == nil {
			rec = copyRecord(p)
		}
		appended, over := s.logChange(h, op, p, off, n, flags, &rec)
		if !appended {
			continue // answered by a drive that is no longer in the slot
		}
		if over {
			return s.relieve()
		}
		return nil
	}
}

// logChange appends the change that h answered to the replay log, if h is still the
// slot's drive (else appended is false, and the change is to be redone). A FUA write is
// durable already and needs an entry only when it overlaps entries that a replay would
// otherwise write over it; its copy is made then. over says that the log is past its
// limit.
func (s *Slot) logChange(h *held, op string, p []byte, off, n int64, flags blockdev.ZeroFlags, rec *record) (appended, over bool) {
	e := entry{off: off, n: n}
	switch op {
	case opZero:
		e.kind, e.flags = logZero, flags&^blockdev.ZeroFast
	case opTrim:
		e.kind = logTrim
	default:
		e.kind = logWrite
	}
	for {
		s.lg.mu.Lock()
		if s.cur.Load() != h {
			s.lg.mu.Unlock()
			return false, false
		}
		if op == opFUA && !s.lg.overlaps(off, n) {
			s.lg.mu.Unlock()
			return true, false
		}
		if e.kind == logWrite && rec.first == nil {
			// A FUA write that needs an entry: copy it outside the lock, then look
			// again.
			s.lg.mu.Unlock()
			*rec = copyRecord(p)
			continue
		}
		e.data = *rec
		*rec = record{}
		s.lg.add(e)
		over = s.lg.cost() > s.limit
		s.lg.mu.Unlock()
		return true, over
	}
}

// relieve flushes the drive for a change that took the replay log past its limit, so
// that memory stays bounded: one such flush at a time; while it runs, the other
// changes go on until the log holds twice the limit, and then wait for it.
func (s *Slot) relieve() error {
	select {
	case s.limitFlush <- struct{}{}:
	default:
		if s.logCost() <= 2*s.limit {
			return nil
		}
		s.limitFlush <- struct{}{} // wait for the running flush, then look again
	}
	defer func() { <-s.limitFlush }()
	if s.logCost() <= s.limit {
		return nil
	}
	if err := s.Flush(); err != nil {
		return fmt.Errorf("the flush that the replay log's limit of %d bytes asked for: %w", s.limit, err)
	}
	return nil
}

func (s *Slot) logCost() int64 {
	s.lg.mu.Lock()
	defer s.lg.mu.Unlock()
	return s.lg.cost()
}

// Flush flushes the drive in the slot, waiting while it is missing, and drops from the
// replay log the changes made before it started.
func (s *Slot) Flush() error {
	for {
		h, err := s.acquire()
		if err != nil {
			return err
		}
		mark, ok := s.markLog(h)
		if !ok {
			continue
		}
		if err := h.dev.Flush(); err != nil {
			if redo, err := s.failed(h, opFlush, 0, 0, err); !redo {
				return err
			}
			continue
		}
		if s.dropLog(h, mark) {
			return nil
		}
		// Flushed a drive that is no longer in the slot: flush the one that is.
	}
}

// markLog returns the seq of the next entry, if h is still the slot's drive: a flush
// of h that started now makes every older entry durable.
func (s *Slot) markLog(h *held) (uint64, bool) {
	s.lg.mu.Lock()
	defer s.lg.mu.Unlock()
	return s.lg.next, s.cur.Load() == h
}

// dropLog drops the entries older than mark, if h is still the slot's drive.
func (s *Slot) dropLog(h *held, mark uint64) bool {
	s.lg.mu.Lock()
	defer s.lg.mu.Unlock()
	if s.cur.Load() != h {
		return false
	}
	s.lg.dropBefore(mark)
	return true
}

// Pull takes the drive out cleanly, as the operator does before removing it: it
// flushes the drive (if the flush fails, Pull returns its error and the drive stays
// in the slot), marks it Missing with reason ("pulled by the operator" if empty) and
// closes it (waiting for the close at most the probe timeout). Requests then wait as
// for a pulled drive. Pull of a missing drive is an error wrapping ErrNotPresent.
func (s *Slot) Pull(reason string) error {
	if reason == "" {
		reason = "pulled by the operator"
	}
	h, closed, err := s.pull(reason)
	s.deliver() // not under opMu: Notify may call Reinsert
	if err != nil {
		return err
	}
	select {
	case err := <-closed:
		if err != nil {
			return fmt.Errorf("pull drive %s at %s: close (the drive is out of the slot): %w", s.id.UUID, h.path, err)
		}
	case <-time.After(s.probeTimeout):
		s.logger.Warn("slot: the pulled drive does not close (a call still runs on it)", "path", h.path)
	}
	return nil
}

// pull is Pull up to the close of the drive, under opMu.
func (s *Slot) pull(reason string) (*held, <-chan error, error) {
	s.opMu.Lock()
	defer s.opMu.Unlock()
	h := s.cur.Load()
	if h == nil {
		return nil, nil, s.absentErr("pull")
	}
	mark, ok := s.markLog(h)
	if !ok {
		return nil, nil, s.absentErr("pull")
	}
	if err := h.dev.Flush(); err != nil {
		return nil, nil, fmt.Errorf("pull drive %s at %s: flush (the drive stays in the slot): %w", s.id.UUID, h.path, err)
	}
	s.dropLog(h, mark)
	s.mu.Lock()
	closed, ok := s.goneLocked(h, reason)
	s.mu.Unlock()
	if !ok {
		return nil, nil, s.absentErr("pull")
	}
	return h, closed, nil
}

// absentErr is the error of an operation (pull) that needs a drive in the slot.
func (s *Slot) absentErr(op string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("%s drive %s: %w", op, s.id.UUID, blockdev.ErrClosed)
	}
	return fmt.Errorf("%s drive %s (last at %s): %w", op, s.id.UUID, s.st.Path, ErrNotPresent)
}

// Check probes the drive now (discovery saw its name vanish): if the probe fails it
// goes Missing. It returns the resulting state. On a missing slot it does nothing.
func (s *Slot) Check() State {
	if h := s.cur.Load(); h != nil {
		s.probeShared(h, func(probeErr error) string { return "a check found it gone: " + probeErr.Error() })
	}
	return s.State()
}

// Reinsert puts the drive back from path: it opens it with Config.Open, checks its
// Identity and Size (another drive: an error wrapping ErrNotSameDrive, nothing written,
// the device closed), replays the log of unflushed changes in order, flushes, then
// makes it present and lets the waiting requests run. If the replay or the flush
// fails, the slot stays Missing and the device is closed. Reinsert of a present slot is
// an error wrapping ErrPresent.
func (s *Slot) Reinsert(path string) error {
	defer s.deliver() // after opMu is released: Notify may call Pull
	s.opMu.Lock()
	defer s.opMu.Unlock()
	s.mu.Lock()
	closed, present := s.closed, s.cur.Load() != nil
	s.mu.Unlock()
	switch {
	case closed:
		return fmt.Errorf("reinsert drive %s: %w", s.id.UUID, blockdev.ErrClosed)
	case present:
		return fmt.Errorf("reinsert drive %s from %s: %w", s.id.UUID, path, ErrPresent)
	case s.open == nil:
		return fmt.Errorf("reinsert drive %s from %s: the slot has no Config.Open", s.id.UUID, path)
	}
	dev, err := s.open(path)
	if err != nil {
		return fmt.Errorf("reinsert drive %s: %w", s.id.UUID, err)
	}
	if err := s.sameDrive(dev, path); err != nil {
		dev.Close()
		return err
	}
	nd := statNode(path)

	// No entry is added or dropped while no drive is in the slot: the log is read
	// outside its lock, from a copy of the list, so that State does not wait for the
	// replay. (Close forgets the entries but leaves their chunks to the collector.)
	s.lg.mu.Lock()
	entries, upTo := slices.Clone(s.lg.entries), s.lg.next
	s.lg.mu.Unlock()
	if err := replay(dev, entries); err != nil {
		dev.Close()
		return fmt.Errorf("reinsert drive %s from %s: replay the %d unflushed changes: %w", s.id.UUID, path, len(entries), err)
	}
	if err := dev.Flush(); err != nil {
		dev.Close()
		return fmt.Errorf("reinsert drive %s from %s: flush after the replay: %w", s.id.UUID, path, err)
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		dev.Close()
		return fmt.Errorf("reinsert drive %s: %w", s.id.UUID, blockdev.ErrClosed)
	}
	h := &held{dev: dev, gen: s.st.Generation + 1, path: path, node: nd}
	s.lg.mu.Lock()
	s.lg.dropBefore(upTo)
	s.cur.Store(h)
	s.lg.mu.Unlock()
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
	now := time.Now()
	s.st = State{Presence: Present, Path: path, Since: now, Returned: now, ReturnedPath: path, Generation: h.gen}
	s.caps = blockdev.CapsOf(dev)
	s.changedLocked()
	s.logger.Info("slot: drive back", "path", path, "replayed", len(entries), "generation", h.gen)
	s.mu.Unlock()
	return nil
}

// sameDrive checks that dev, opened at path, is the slot's drive: the same Identity
// and size.
func (s *Slot) sameDrive(dev blockdev.Device, path string) error {
	id, err := Identify(dev)
	switch {
	case errors.Is(err, luks2.ErrNotLUKS):
		return fmt.Errorf("reinsert drive %s: %s holds no LUKS2 header: %w", s.id.UUID, path, ErrNotSameDrive)
	case err != nil:
		return fmt.Errorf("reinsert drive %s from %s: %w", s.id.UUID, path, err)
	case id.UUID != s.id.UUID:
		return fmt.Errorf("reinsert drive %s: %s holds drive %s: %w", s.id.UUID, path, id.UUID, ErrNotSameDrive)
	case id.Digest != s.id.Digest:
		return fmt.Errorf("reinsert drive %s: %s holds a drive of that UUID with another data key (reformatted): %w", s.id.UUID, path, ErrNotSameDrive)
	case dev.Size() != s.size:
		return fmt.Errorf("reinsert drive %s: %s holds it with %d bytes, the slot's has %d: %w", s.id.UUID, path, dev.Size(), s.size, ErrNotSameDrive)
	}
	return nil
}

// Close closes the slot and the drive in it (without a flush, as every Device). Calls
// waiting for a missing drive fail at once with blockdev.ErrClosed, and so does every
// later call; the replay log is dropped.
func (s *Slot) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("close drive %s: %w", s.id.UUID, blockdev.ErrClosed)
	}
	s.closed = true
	h := s.cur.Load()
	s.lg.mu.Lock()
	s.cur.Store(nil)
	s.lg.forget()
	s.lg.mu.Unlock()
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
	s.st.Presence, s.st.Since, s.st.TimedOut = Closed, time.Now(), false
	s.changedLocked()
	s.logger.Info("slot: closed", "path", s.st.Path)
	s.mu.Unlock()
	s.deliver()
	if h != nil {
		if err := h.dev.Close(); err != nil {
			return fmt.Errorf("close drive %s at %s: %w", s.id.UUID, h.path, err)
		}
	}
	return nil
}
