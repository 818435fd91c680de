package discovery

import (
	"cmp"
	"context"
	"errors"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"time"
)

// Defaults of WatchOptions.
const (
	DefaultRescan   = 30 * time.Second
	DefaultDebounce = 100 * time.Millisecond
)

// WatchOptions tune a Watcher. The zero value means the defaults.
type WatchOptions struct {
	// Rescan is the period of the fallback rescan; DefaultRescan if 0.
	Rescan time.Duration
	// Debounce is the wait between a trigger (uevent, inotify) and the rescan it
	// causes; DefaultDebounce if 0.
	Debounce time.Duration
	// NoUevents leaves the kernel uevent socket closed: changes are then seen by
	// inotify and the periodic rescan only.
	NoUevents bool
}

// ChangeKind says how a candidate changed between two scans.
type ChangeKind string

const (
	// Appeared: a device (a Key) not seen in the previous scan.
	Appeared ChangeKind = "appeared"
	// Changed: the same device with other names, size, header or errors.
	Changed ChangeKind = "changed"
	// Vanished: a device seen in the previous scan and not in this one.
	Vanished ChangeKind = "vanished"
)

// Change is one candidate's change.
type Change struct {
	Kind ChangeKind
	// Candidate as it is now; for Vanished, as it was last seen.
	Candidate Candidate
	// Previous is the candidate before, for Changed.
	Previous *Candidate
}

// Update is the result of one of a Watcher's scans and its differences from the
// previous Update.
type Update struct {
	Snapshot *Snapshot
	// Changes, vanished first, then changed, then appeared, each by path. In the
	// first Update, every candidate has appeared.
	Changes []Change
}

// Watcher rescans when devices may have changed (see the package doc).
type Watcher struct {
	s        *Scanner
	rescan   time.Duration
	debounce time.Duration
	updates  chan Update
	trigger  chan struct{} // debounced
	now      chan struct{} // Rescan: at once

	ctx    context.Context
	cancel context.CancelFunc
	loop   sync.WaitGroup // the scanning goroutine
	feeds  sync.WaitGroup // the uevent and inotify readers
	ue     *ueventSocket  // nil when unavailable or off
	in     *dirWatcher    // nil when unavailable
	once   sync.Once
}

// Watch starts a Watcher. Its first Update holds the first scan, sent even if it
// found nothing. Use one Watcher per Scanner (a probe that returns late wakes one).
func (s *Scanner) Watch(opts WatchOptions) (*Watcher, error) {
	w := &Watcher{
		s:        s,
		rescan:   cmp.Or(opts.Rescan, DefaultRescan),
		debounce: cmp.Or(opts.Debounce, DefaultDebounce),
		updates:  make(chan Update),
		trigger:  make(chan struct{}, 1),
		now:      make(chan struct{}, 1),
	}
	if w.rescan < 0 || w.debounce < 0 {
		return nil, errors.New("discovery: negative rescan period or debounce")
	}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	if opts.NoUevents {
		s.log.Info("discovery: kernel uevents off; block devices are seen by the periodic rescan", "period", w.rescan)
	} else if ue, err := openUevents(); err != nil {
		s.log.Warn("discovery: kernel uevents unavailable; block devices are seen by the periodic rescan", "period", w.rescan, "err", err)
	} else {
		w.ue = ue
		w.feeds.Go(func() { ue.run(w.poke, s.log) })
	}
	if in, err := newDirWatcher(); err != nil {
		s.log.Warn("discovery: inotify unavailable; image files are seen by the periodic rescan", "period", w.rescan, "err", err)
	} else {
		w.in = in
		w.feeds.Go(func() { in.run(w.poke, s.log) })
	}
	w.loop.Go(w.run)
	return w, nil
}

// Updates returns the channel of updates. It is closed when the Watcher is closed.
func (w *Watcher) Updates() <-chan Update { return w.updates }

// Rescan asks for a scan now, without the debounce. It does not wait for it: its
// result comes as an Update if anything changed.
func (w *Watcher) Rescan() {
	select {
	case w.now <- struct{}{}:
	default:
	}
}

// poke asks for a debounced scan.
func (w *Watcher) poke() {
	select {
	case w.trigger <- struct{}{}:
	default:
	}
}

// Close stops the Watcher and waits for its goroutines (probes stuck in the kernel
// excepted; see the package doc). It is idempotent.
func (w *Watcher) Close() error {
	w.once.Do(func() {
		w.cancel()
		w.loop.Wait()
		if w.ue != nil {
			w.ue.close()
		}
		if w.in != nil {
			w.in.close()
		}
		w.feeds.Wait()
	})
	return nil
}

func (w *Watcher) run() {
	defer close(w.updates)
	var last map[Key]Candidate
	ticker := time.NewTicker(w.rescan)
	defer ticker.Stop()
	for {
		if w.in != nil {
			w.in.sync(w.watchDirs(), w.s.log)
		}
		snap, err := w.s.Scan(w.ctx)
		if err != nil {
			return // closed
		}
		changes := diff(last, snap)
		if last == nil || len(changes) > 0 {
			select {
			case w.updates <- Update{Snapshot: snap, Changes: changes}:
			case <-w.ctx.Done():
				return
			}
		}
		last = make(map[Key]Candidate, len(snap.Candidates))
		for _, c := range snap.Candidates {
			last[c.Key] = c
		}
		if !w.wait(ticker.C) {
			return
		}
	}
}

// wait returns when it is time to scan again, false when the Watcher is closed.
func (w *Watcher) wait(tick <-chan time.Time) bool {
	select {
	case <-w.ctx.Done():
		return false
	case <-tick:
	case <-w.now:
	case <-w.s.late:
	case <-w.trigger:
		t := time.NewTimer(w.debounce)
		defer t.Stop()
		select {
		case <-w.ctx.Done():
			return false
		case <-t.C:
		case <-w.now:
		}
	}
	return true
}

// watchDirs are the directories inotify watches: the Dirs, and the directories of
// the Paths and of the Patterns (those without wildcards), except /dev itself, whose
// changes come with uevents. /dev/disk/by-id is watched, because udev makes its
// links after the kernel's uevent.
func (w *Watcher) watchDirs() []string {
	src := w.s.currentSources()
	var dirs []string
	add := func(d string) {
		if d != "/dev" && !hasMeta(d) && !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	for _, d := range src.Dirs {
		add(d)
	}
	for _, p := range src.Paths {
		add(filepath.Dir(p))
	}
	for _, p := range src.Patterns {
		add(filepath.Dir(p))
	}
	return dirs
}

// diff lists the changes from last to snap; last nil means that everything appeared.
func diff(last map[Key]Candidate, snap *Snapshot) []Change {
	var vanished, changed, appeared []Change
	seen := make(map[Key]bool, len(snap.Candidates))
	for _, c := range snap.Candidates {
		seen[c.Key] = true
		old, ok := last[c.Key]
		switch {
		case !ok:
			appeared = append(appeared, Change{Kind: Appeared, Candidate: c})
		case !sameCandidate(old, c):
			changed = append(changed, Change{Kind: Changed, Candidate: c, Previous: &old})
		}
	}
	for k, c := range last {
		if !seen[k] {
			vanished = append(vanished, Change{Kind: Vanished, Candidate: c})
		}
	}
	slices.SortFunc(vanished, func(a, b Change) int { return cmp.Compare(a.Candidate.Path, b.Candidate.Path) })
	return slices.Concat(vanished, changed, appeared)
}

// sameCandidate compares everything a Candidate reports (errors by their text).
func sameCandidate(a, b Candidate) bool {
	return a.Key == b.Key && a.Kind == b.Kind && slices.Equal(a.Paths, b.Paths) &&
		a.BackingFile == b.BackingFile && a.Size == b.Size && a.UUID == b.UUID &&
		a.Label == b.Label && reflect.DeepEqual(a.Token, b.Token) &&
		errText(a.HeaderWarning) == errText(b.HeaderWarning) && errText(a.Err) == errText(b.Err) &&
		a.Duplicate == b.Duplicate
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
