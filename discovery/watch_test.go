package discovery_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/discovery"
	"github.com/atrest/atrest/internal/drivebay"
)

// seenBound is how long a change may take to arrive in these tests. The Watcher
// reacts within a second (the debounce and one scan); the bound is generous because
// other tests load the machine, and because a scan of /dev/loop* also probes other
// tests' loop devices, some of which may hang for a probe timeout. The latencies
// measured are logged.
const seenBound = 15 * time.Second

func watch(t *testing.T, s *discovery.Scanner, wopts discovery.WatchOptions) *discovery.Watcher {
	t.Helper()
	w, err := s.Watch(wopts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	select {
	case u, ok := <-w.Updates():
		if !ok {
			t.Fatal("the watcher ended before its first update")
		}
		for _, c := range u.Changes {
			if c.Kind != discovery.Appeared {
				t.Errorf("first update: %s %s", c.Kind, c.Candidate.Path)
			}
		}
	case <-time.After(seenBound):
		t.Fatal("no first update")
	}
	return w
}

// await waits for a change of kind to the drive with the UUID id, and returns it and
// how long it took from start.
func await(t *testing.T, w *discovery.Watcher, kind discovery.ChangeKind, id string, start time.Time) discovery.Change {
	t.Helper()
	timeout := time.After(seenBound)
	for {
		select {
		case u, ok := <-w.Updates():
			if !ok {
				t.Fatal("the watcher ended")
			}
			for _, c := range u.Changes {
				if c.Kind == kind && c.Candidate.UUID == id {
					t.Logf("%s %s after %v", kind, c.Candidate.Path, time.Since(start).Round(time.Millisecond))
					return c
				}
			}
		case <-timeout:
			t.Fatalf("drive %s not %s within %v", id, kind, seenBound)
		}
	}
}

// nextLoop returns the loop device that the next attach will most likely take
// (LOOP_CTL_GET_FREE, as volmount.Attach asks). The tests watch that one name rather
// than /dev/loop*: a probe of another test's loop device whose backing file hangs on
// purpose would block this test process's exit until that test lets go.
func nextLoop(t *testing.T) string {
	t.Helper()
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(ctl)
	n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("/dev/loop%d", n)
}

// attachWatched attaches a loop device over img while s scans for exactly that
// device, and returns its path and its detach function. If another process takes
// the predicted device first, it tries again.
func attachWatched(t *testing.T, s *discovery.Scanner, img string) (dev string, detach func()) {
	t.Helper()
	for try := 0; ; try++ {
		want := nextLoop(t)
		if err := s.SetSources(discovery.Sources{Patterns: []string{want}}); err != nil {
			t.Fatal(err)
		}
		dev, detach = attach(t, img)
		if dev == want || try == 10 {
			return dev, detach
		}
		detach()
	}
}

// TestWatchUevent: a loop device attached while the watcher runs is seen, and seen
// vanish when detached, through kernel uevents alone: inotify does not watch /dev,
// and the periodic rescan is an hour away.
func TestWatchUevent(t *testing.T) {
	img, id := newDrive(t, "", token())
	s := newScanner(t, discovery.Options{})
	w := watch(t, s, discovery.WatchOptions{Rescan: time.Hour})
	start := time.Now()
	dev, detach := attachWatched(t, s, img)
	c := await(t, w, discovery.Appeared, id, start)
	if c.Candidate.Path != dev || c.Candidate.Kind != discovery.KindLoop {
		t.Errorf("appeared at %s as %s, want %s as a loop device", c.Candidate.Path, c.Candidate.Kind, dev)
	}
	start = time.Now()
	detach()
	await(t, w, discovery.Vanished, id, start)
}

// TestWatchInotify: image files moved into, written into, moved out of and deleted
// from a watched directory are seen through inotify alone (no uevents, no periodic
// rescan).
func TestWatchInotify(t *testing.T) {
	dir := t.TempDir()
	w := watch(t, newScanner(t, discovery.Options{Sources: discovery.Sources{Dirs: []string{dir}}}),
		discovery.WatchOptions{Rescan: time.Hour, NoUevents: true})

	img, id := newDrive(t, "", token())
	moved := filepath.Join(dir, "moved.img")
	start := time.Now()
	if err := os.Rename(img, moved); err != nil {
		t.Fatal(err)
	}
	await(t, w, discovery.Appeared, id, start)

	// Written in place: created empty (perhaps seen as no drive yet), then formatted.
	start = time.Now()
	written, id2 := newDrive(t, filepath.Join(dir, "written.img"), token())
	awaitAny(t, w, id2, start)

	start = time.Now()
	if err := os.Rename(moved, filepath.Join(t.TempDir(), "away.img")); err != nil {
		t.Fatal(err)
	}
	await(t, w, discovery.Vanished, id, start)

	start = time.Now()
	if err := os.Remove(written); err != nil {
		t.Fatal(err)
	}
	await(t, w, discovery.Vanished, id2, start)
}

// awaitAny waits until the drive with UUID id has appeared or changed into a
// candidate with that UUID.
func awaitAny(t *testing.T, w *discovery.Watcher, id string, start time.Time) {
	t.Helper()
	timeout := time.After(seenBound)
	for {
		select {
		case u := <-w.Updates():
			for _, c := range u.Changes {
				if c.Kind != discovery.Vanished && c.Candidate.UUID == id {
					t.Logf("%s %s after %v", c.Kind, c.Candidate.Path, time.Since(start).Round(time.Millisecond))
					return
				}
			}
		case <-timeout:
			t.Fatalf("drive %s not seen within %v", id, seenBound)
		}
	}
}

// TestWatchWithoutUevents: with uevents off, the periodic rescan finds a loop device
// attached, and Rescan finds one at once.
func TestWatchWithoutUevents(t *testing.T) {
	t.Run("periodic", func(t *testing.T) {
		img, id := newDrive(t, "", token())
		s := newScanner(t, discovery.Options{})
		w := watch(t, s, discovery.WatchOptions{Rescan: 300 * time.Millisecond, NoUevents: true})
		start := time.Now()
		_, detach := attachWatched(t, s, img)
		await(t, w, discovery.Appeared, id, start)
		start = time.Now()
		detach()
		await(t, w, discovery.Vanished, id, start)
	})
	t.Run("Rescan", func(t *testing.T) {
		img, id := newDrive(t, "", token())
		s := newScanner(t, discovery.Options{})
		w := watch(t, s, discovery.WatchOptions{Rescan: time.Hour, NoUevents: true})
		start := time.Now()
		attachWatched(t, s, img)
		w.Rescan()
		await(t, w, discovery.Appeared, id, start)
	})
}

// TestWatchLateProbe: a drive that stops answering stays the same candidate (its
// loop device keeps the backing file's key), and is rescanned when its stuck probe
// returns, without any other trigger.
func TestWatchLateProbe(t *testing.T) {
	bay := drivebay.Mount(t, drivebay.Options{})
	img, id := newDrive(t, "", token())
	if err := bay.Insert("sdc", img); err != nil {
		t.Fatal(err)
	}
	dev, err := bay.Attach("sdc")
	if err != nil {
		t.Fatal(err)
	}
	hold, err := os.Open(dev) // keeps the pulled loop device bound
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()
	s := newScanner(t, discovery.Options{ProbeTimeout: 300 * time.Millisecond, Sources: discovery.Sources{Paths: []string{dev}}})
	w, err := s.Watch(discovery.WatchOptions{Rescan: time.Hour, NoUevents: true})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	u := <-w.Updates()
	if len(u.Snapshot.Candidates) != 1 || u.Snapshot.Candidates[0].UUID != id {
		t.Fatalf("first update: %s", describe(u.Snapshot.Candidates))
	}
	key := u.Snapshot.Candidates[0].Key

	next := func(what string, class error) {
		t.Helper()
		select {
		case u := <-w.Updates():
			if len(u.Changes) != 1 || u.Changes[0].Kind != discovery.Changed || u.Changes[0].Candidate.Key != key || !errors.Is(u.Changes[0].Candidate.Err, class) {
				t.Fatalf("%s: changes %+v, want the drive (%s) changed to %v", what, u.Changes, key, class)
			}
		case <-time.After(seenBound):
			t.Fatalf("%s: no update", what)
		}
	}
	if err := bay.Pull("sdc", drivebay.PullHang); err != nil {
		t.Fatal(err)
	}
	w.Rescan()
	next("hung", discovery.ErrNotAnswering)
	if err := bay.Reinsert("sdc", "sdf"); err != nil { // the held I/O fails now
		t.Fatal(err)
	}
	next("released", discovery.ErrIO)
}

// TestWatchClose: Close ends every goroutine of the watcher (uevents, inotify, the
// scanning loop) and the updates channel.
func TestWatchClose(t *testing.T) {
	before := runtime.NumGoroutine()
	dir := t.TempDir()
	// No /dev/loop*: a probe of another test's hung loop device would outlive Close.
	s := newScanner(t, discovery.Options{Sources: discovery.Sources{Dirs: []string{dir}}})
	w, err := s.Watch(discovery.WatchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	<-w.Updates()
	if n := runtime.NumGoroutine(); n < before+3 {
		t.Fatalf("%d goroutines while watching, %d before: the watcher runs fewer than 3", n, before)
	}
	closed := make(chan struct{})
	go func() { w.Close(); w.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(seenBound):
		t.Fatal("Close did not return")
	}
	if _, ok := <-w.Updates(); ok {
		t.Error("an update after Close")
	}
	deadline := time.Now().Add(seenBound)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines after Close, %d before:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}
