package blockdev_test

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
)

// limit is the bound of these tests; margin is what a loaded machine may add to it.
const (
	limit  = 200 * time.Millisecond
	margin = 5 * time.Second
)

// newBounded returns a Bounded over a Faulty over a Mem of 1 MiB, and the Faulty.
func newBounded(t *testing.T) (*blockdev.Bounded, *blockdev.Faulty) {
	t.Helper()
	f := blockdev.NewFaulty(blockdev.NewMem(1 << 20))
	b := blockdev.Bound(f, limit)
	closeQuietly(t, b)
	return b, f
}

// waitFor polls cond until it holds, for at most 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10 s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestBoundTimesOut: every call on a hung device fails with ErrTimeout after the limit
// (and not much later), and the device works again once the hang is released.
func TestBoundTimesOut(t *testing.T) {
	b, f := newBounded(t)
	release := f.Hang()
	defer release()
	for _, c := range []struct {
		what string
		call func() error
	}{
		{"ReadAt", func() error { _, err := b.ReadAt(make([]byte, 4096), 0); return err }},
		{"WriteAt", func() error { _, err := b.WriteAt(make([]byte, 4096), 0); return err }},
		{"WriteAtFUA", func() error { _, err := b.WriteAtFUA(make([]byte, 4096), 0); return err }},
		{"Trim", func() error { return b.Trim(0, 4096) }},
		{"WriteZeroes", func() error { return b.WriteZeroes(0, 4096, 0) }},
		{"Flush", b.Flush},
	} {
		start := time.Now()
		err := c.call()
		d := time.Since(start)
		if !errors.Is(err, blockdev.ErrTimeout) {
			t.Errorf("%s on a hung device: %v, want ErrTimeout", c.what, err)
		}
		if d < limit || d > limit+margin {
			t.Errorf("%s on a hung device returned after %v, with a limit of %v", c.what, d, limit)
		}
	}
	if n := b.Stuck(); n != 6 {
		t.Errorf("Stuck = %d with 6 calls hung, want 6", n)
	}
	release()
	waitFor(t, "the hung calls return", func() bool { return b.Stuck() == 0 })
	if _, err := b.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Errorf("ReadAt once released: %v", err)
	}
}

// TestBoundReadBufferUntouched: the caller's read buffer is never written after ReadAt
// returned, even when the hung read completes later (run with -race: a write to it
// from the read's goroutine would be a data race with this test's writes).
func TestBoundReadBufferUntouched(t *testing.T) {
	b, f := newBounded(t)
	if _, err := f.WriteAt(bytes.Repeat([]byte{0x5a}, 8192), 0); err != nil {
		t.Fatal(err)
	}
	release := f.Hang()
	defer release()
	p := make([]byte, 8192)
	if _, err := b.ReadAt(p, 0); !errors.Is(err, blockdev.ErrTimeout) {
		t.Fatalf("ReadAt on a hung device: %v, want ErrTimeout", err)
	}
	for i := range p {
		p[i] = 0xee // the caller reuses its buffer at once
	}
	reads := f.Stats().Reads
	release()
	waitFor(t, "the hung read returns", func() bool { return b.Stuck() == 0 })
	if f.Stats().Reads != reads+1 {
		t.Fatalf("the hung read did not run once released (reads %d, then %d)", reads, f.Stats().Reads)
	}
	if !bytes.Equal(p, bytes.Repeat([]byte{0xee}, 8192)) {
		t.Fatal("the read that timed out wrote the caller's buffer after ReadAt returned")
	}
	// The same buffer, read in time, gets the data.
	if n, err := b.ReadAt(p, 0); n != len(p) || err != nil || !bytes.Equal(p, bytes.Repeat([]byte{0x5a}, 8192)) {
		t.Fatalf("ReadAt in time: %d, %v", n, err)
	}
}

// TestBoundWriteAfterTimeout: a write that timed out may still land, but with the data
// the caller passed: its later changes to the buffer never reach the device.
func TestBoundWriteAfterTimeout(t *testing.T) {
	b, f := newBounded(t)
	release := f.Hang()
	defer release()
	p := bytes.Repeat([]byte{0xaa}, 4096)
	if _, err := b.WriteAt(p, 8192); !errors.Is(err, blockdev.ErrTimeout) {
		t.Fatalf("WriteAt on a hung device: %v, want ErrTimeout", err)
	}
	for i := range p {
		p[i] = 0xbb
	}
	release()
	waitFor(t, "the hung write returns", func() bool { return b.Stuck() == 0 })
	got := make([]byte, 4096)
	if _, err := b.ReadAt(got, 8192); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Repeat([]byte{0xaa}, 4096)) {
		t.Fatalf("the write that timed out landed as %#x..., want the caller's data at the call (0xaa)", got[:4])
	}
}

// TestBoundReleasesGoroutines: calls that timed out hold a goroutine each until the
// device answers, and none after.
func TestBoundReleasesGoroutines(t *testing.T) {
	b, f := newBounded(t)
	before := runtime.NumGoroutine()
	release := f.Hang()
	defer release()
	const calls = 20
	var wg sync.WaitGroup
	for i := range calls {
		wg.Go(func() {
			if _, err := b.ReadAt(make([]byte, 512), int64(i)*512); !errors.Is(err, blockdev.ErrTimeout) {
				t.Errorf("ReadAt on a hung device: %v, want ErrTimeout", err)
			}
		})
	}
	wg.Wait()
	if n := b.Stuck(); n != calls {
		t.Errorf("Stuck = %d after %d timed out, want %d", n, calls, calls)
	}
	// Each stuck call is a goroutine blocked in the device. (Counting all goroutines
	// against the count before is not exact: goroutines of earlier tests may end
	// meanwhile, which made this check flaky under -race.)
	if n := f.Stats().Hung; n != calls {
		t.Errorf("%d calls hung in the device after %d timed out, want %d", n, calls, calls)
	}
	release()
	waitFor(t, "the stuck calls return", func() bool { return b.Stuck() == 0 && f.Stats().Hung == 0 })
	waitFor(t, "the goroutines end", func() bool { return runtime.NumGoroutine() <= before })
}

// blockingClose is a device whose Close blocks until release is closed.
type blockingClose struct {
	*blockdev.Mem
	release chan struct{}
}

func (d blockingClose) Close() error {
	<-d.release
	return d.Mem.Close()
}

// TestBoundClose: Close is bounded too, every call after it fails with ErrClosed, and a
// second Close as well.
func TestBoundClose(t *testing.T) {
	lower := blockingClose{blockdev.NewMem(1 << 20), make(chan struct{})}
	b := blockdev.Bound(lower, limit)
	start := time.Now()
	if err := b.Close(); !errors.Is(err, blockdev.ErrTimeout) {
		t.Errorf("Close of a device whose Close hangs: %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > limit+margin {
		t.Errorf("Close returned after %v, with a limit of %v", d, limit)
	}
	if _, err := b.ReadAt(make([]byte, 10), 0); !errors.Is(err, blockdev.ErrClosed) {
		t.Errorf("ReadAt after Close: %v, want ErrClosed", err)
	}
	if err := b.Close(); !errors.Is(err, blockdev.ErrClosed) {
		t.Errorf("second Close: %v, want ErrClosed", err)
	}
	close(lower.release)
	waitFor(t, "the lower Close returns", func() bool { return b.Stuck() == 0 })
	if _, err := lower.ReadAt(make([]byte, 10), 0); !errors.Is(err, blockdev.ErrClosed) {
		t.Errorf("the lower device is open after its Close returned: %v", err)
	}
}

func TestBoundRefusesBadLimit(t *testing.T) {
	for _, l := range []time.Duration{0, -time.Second} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("Bound with a limit of %v did not panic", l)
				}
			}()
			blockdev.Bound(blockdev.NewMem(4096), l)
		}()
	}
}

// BenchmarkBound measures what the watchdog costs per call over a Mem, which answers at
// memory speed: the worst case, since a real drive's latency dwarfs it.
//
//	go test -run '^$' -bench 'BenchmarkBound' -benchtime 2s ./blockdev
func BenchmarkBound(b *testing.B) {
	mem := blockdev.NewMem(64 << 20)
	bounded := blockdev.Bound(mem, time.Minute)
	for _, size := range []int{4 << 10, 64 << 10, 1 << 20} {
		for _, dev := range []struct {
			name string
			dev  blockdev.Device
		}{{"mem", mem}, {"bounded", bounded}} {
			p := make([]byte, size)
			b.Run(fmt.Sprintf("read/%s/%dK", dev.name, size>>10), func(b *testing.B) {
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					if _, err := dev.dev.ReadAt(p, int64(i*size)%(64<<20)); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run(fmt.Sprintf("write/%s/%dK", dev.name, size>>10), func(b *testing.B) {
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					if _, err := dev.dev.WriteAt(p, int64(i*size)%(64<<20)); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
	b.Run("flush/mem", func(b *testing.B) {
		for b.Loop() {
			mem.Flush()
		}
	})
	b.Run("flush/bounded", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			bounded.Flush()
		}
	})
}
