package blockcrypt

import (
	"bytes"
	"sync"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// gated wraps a lower device so that a test can stop a call in the middle: the first
// read (or write) of the armed lower offset signals entered and waits for release. An
// armed write is torn: its first half lands before the pause, the rest after, as a
// real device may do.
type gated struct {
	blockdev.Device
	mu      sync.Mutex
	readAt  int64 // armed offsets, -1 when disarmed
	writeAt int64
	entered chan struct{}
	release chan struct{}
}

func newGated(lower blockdev.Device) *gated {
	return &gated{Device: lower, readAt: -1, writeAt: -1, entered: make(chan struct{}), release: make(chan struct{})}
}

func (g *gated) take(armed *int64, off int64) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if *armed == off {
		*armed = -1
		return true
	}
	return false
}

func (g *gated) ReadAt(p []byte, off int64) (int, error) {
	if g.take(&g.readAt, off) {
		close(g.entered)
		<-g.release
	}
	return g.Device.ReadAt(p, off)
}

func (g *gated) WriteAt(p []byte, off int64) (int, error) {
	if g.take(&g.writeAt, off) {
		h := len(p) / 2
		if _, err := g.Device.WriteAt(p[:h], off); err != nil {
			return 0, err
		}
		close(g.entered)
		<-g.release
		n, err := g.Device.WriteAt(p[h:], off+int64(h))
		return h + n, err
	}
	return g.Device.WriteAt(p, off)
}

// pause is how long a test gives a call that ought to be blocked to (wrongly) finish.
// The tests cannot fail because of it when the locks are right; it only has to be long
// enough for a wrong implementation to be caught.
const pause = 30 * time.Millisecond

// finishedWithin reports whether a call that ought to be blocked sends its result on done
// within pause (the result is then consumed).
func finishedWithin(done <-chan error) bool {
	select {
	case <-done:
		return true
	case <-time.After(pause):
		return false
	}
}

// TestWholeWriteWaitsForRMW: a whole-sector write that arrives while a partial write of
// the same sector is between its read and its write must not land in between, or the
// read-modify-write would write the stale sector back over it.
func TestWholeWriteWaitsForRMW(t *testing.T) {
	g := newGated(blockdev.NewMem(8 * 4096))
	d, err := New(g, Config{Key: testKey(5), Offset: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d.WriteAt(make([]byte, d.Size()), 0)
	g.mu.Lock()
	g.readAt = 4096 + 4096 // lower offset of region sector 1
	g.mu.Unlock()
	rmwDone := make(chan error)
	go func() { _, err := d.WriteAt([]byte{1}, 4096+10); rmwDone <- err }()
	<-g.entered
	whole := bytes.Repeat([]byte{2}, 4096)
	wholeDone := make(chan error)
	go func() { _, err := d.WriteAt(whole, 4096); wholeDone <- err }()
	early := finishedWithin(wholeDone)
	if early {
		t.Error("the whole-sector write finished while a read-modify-write of its sector was under way")
	}
	close(g.release)
	if err := <-rmwDone; err != nil {
		t.Fatal(err)
	}
	if !early {
		if err := <-wholeDone; err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 4096)
	d.ReadAt(got, 4096)
	if !bytes.Equal(got, whole) {
		t.Fatalf("the whole-sector write was lost: sector reads %x...", got[:16])
	}
}

// TestReadWaitsForRMW: a read of bytes that nobody writes must not see the sector while a
// read-modify-write of it is half written on the lower device.
func TestReadWaitsForRMW(t *testing.T) {
	for _, ss := range []int{512, 4096} {
		g := newGated(blockdev.NewMem(8 * 4096))
		d, err := New(g, Config{Key: testKey(6), SectorSize: ss})
		if err != nil {
			t.Fatal(err)
		}
		data := bytes.Repeat([]byte{7}, int(d.Size()))
		d.WriteAt(data, 0)
		g.mu.Lock()
		g.writeAt = int64(ss) // region sector 1, no offset
		g.mu.Unlock()
		rmwDone := make(chan error)
		go func() { _, err := d.WriteAt([]byte{8}, int64(ss)+1); rmwDone <- err }()
		<-g.entered
		readDone := make(chan []byte)
		go func() {
			p := make([]byte, 16)
			d.ReadAt(p, int64(2*ss)-16) // the last block of sector 1: not written
			readDone <- p
		}()
		var got []byte
		select {
		case got = <-readDone:
			t.Errorf("sector size %d: a read finished while the sector was half written", ss)
		case <-time.After(pause):
		}
		close(g.release)
		if err := <-rmwDone; err != nil {
			t.Fatal(err)
		}
		if got == nil {
			got = <-readDone
		}
		if !bytes.Equal(got, data[:16]) {
			t.Errorf("sector size %d: read %x of bytes nobody wrote, want %x", ss, got, data[:16])
		}
		d.Close()
	}
}

// TestPartialWritesSerialize: a second partial write of the same sector waits for the
// first to finish, and both land.
func TestPartialWritesSerialize(t *testing.T) {
	g := newGated(blockdev.NewMem(4 * 4096))
	d, err := New(g, Config{Key: testKey(7)})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d.WriteAt(make([]byte, d.Size()), 0)
	g.mu.Lock()
	g.readAt = 0
	g.mu.Unlock()
	first := make(chan error)
	go func() { _, err := d.WriteAt([]byte{1, 1}, 100); first <- err }()
	<-g.entered
	second := make(chan error)
	go func() { _, err := d.WriteAt([]byte{2, 2}, 200); second <- err }()
	early := finishedWithin(second)
	if early {
		t.Error("a second read-modify-write of the sector finished during the first")
	}
	close(g.release)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if !early {
		if err := <-second; err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 4096)
	d.ReadAt(got, 0)
	if !bytes.Equal(got[100:102], []byte{1, 1}) || !bytes.Equal(got[200:202], []byte{2, 2}) {
		t.Fatalf("a partial write was lost: %x %x", got[100:102], got[200:202])
	}
}
