package slot_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/slot"
)

// The drives of the unit tests are memory devices that outlive the Faulty devices
// put over them, one per insertion, as a disk outlives its trips through a bay.

// headerArea is the size of the two header copies that luks2.Load reads.
const headerArea = 2 * luks2.HeaderSize

// testSize is the size of the test drives: the header area, then room for data.
const testSize = 4 << 20

// dataOff is where the tests write data: after the header area.
const dataOff = 1 << 20

// makeHeader returns the header area of a fresh LUKS2 drive with the UUID (random if
// empty) and a random data key.
func makeHeader(uuid string) ([]byte, error) {
	mem := blockdev.NewMem(luks2.DataOffset + 4096)
	vk := make([]byte, luks2.KeySize)
	rand.Read(vk)
	if _, err := luks2.Format(mem, luks2.FormatOptions{VolumeKey: vk, Passphrase: []byte("test passphrase"), UUID: uuid}); err != nil {
		return nil, err
	}
	hdr := make([]byte, headerArea)
	if _, err := mem.ReadAt(hdr, 0); err != nil {
		return nil, err
	}
	return hdr, nil
}

// formatHeader is makeHeader in a test.
func formatHeader(t testing.TB, uuid string) []byte {
	t.Helper()
	hdr, err := makeHeader(uuid)
	if err != nil {
		t.Fatal(err)
	}
	return hdr
}

// sharedHeader is the header of most test drives, made once.
var sharedHeader = sync.OnceValue(func() []byte {
	hdr, err := makeHeader("")
	if err != nil {
		panic(err)
	}
	return hdr
})

// newDrive returns a memory drive of size bytes that carries hdr.
func newDrive(t testing.TB, size int64, hdr []byte) *blockdev.Mem {
	t.Helper()
	mem := blockdev.NewMem(size)
	if _, err := mem.WriteAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	return mem
}

// kept is a memory drive seen through a Faulty device: closing it leaves the memory
// as it is, for the next insertion.
type kept struct{ *blockdev.Mem }

func (kept) Close() error { return nil }

// unplugged is a Faulty device whose Close loses its volatile cache first: a drive
// that the slot lets go of after a pull had its cache lost when it lost power.
type unplugged struct{ *blockdev.Faulty }

func (u unplugged) Close() error {
	u.PowerCut()
	return u.Faulty.Close()
}

// insert puts mem into a Faulty device, as a drive inserted into a bay.
func insert(mem *blockdev.Mem) *blockdev.Faulty { return blockdev.NewFaulty(kept{mem}) }

// noClose is a device that the slot cannot close: a call stuck on it returns whatever
// the device answers, after the slot let go of it.
type noClose struct{ *blockdev.Faulty }

func (noClose) Close() error { return nil }

// closeCounter is a device that counts its closes.
type closeCounter struct {
	blockdev.Device
	mu     sync.Mutex
	closes int
}

func (c *closeCounter) Close() error {
	c.mu.Lock()
	c.closes++
	c.mu.Unlock()
	return c.Device.Close()
}

func (c *closeCounter) closed() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closes
}

// pull pulls the drive f out from under s, as a power cut does (its volatile cache is
// lost), and has the slot find it gone.
func pull(t testing.TB, s *slot.Slot, f *blockdev.Faulty) {
	t.Helper()
	f.Vanish()
	f.PowerCut()
	if st := s.Check(); st.Presence != slot.Missing {
		t.Fatalf("Check of a pulled drive: %+v", st)
	}
}

// absentPath is a path where no drive is: a probe there fails.
func absentPath(t testing.TB) string { return filepath.Join(t.TempDir(), "sdz") }

// opener returns a Config.Open that opens the devices of devs by path, once each.
func opener(devs map[string]blockdev.Device) func(string) (blockdev.Device, error) {
	var mu sync.Mutex
	return func(path string) (blockdev.Device, error) {
		mu.Lock()
		defer mu.Unlock()
		d, ok := devs[path]
		if !ok {
			return nil, os.ErrNotExist
		}
		delete(devs, path)
		return d, nil
	}
}

// newSlot makes a slot over dev and closes it at the end of the test.
func newSlot(t testing.TB, dev blockdev.Device, cfg slot.Config) *slot.Slot {
	t.Helper()
	s, err := slot.New(dev, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// waitFor waits until the slot's state satisfies ok, failing the test after 20 s.
func waitFor(t testing.TB, s *slot.Slot, what string, ok func(slot.State) bool) slot.State {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := s.State()
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("the slot is not %s after 20 s: %+v", what, st)
		}
		time.Sleep(time.Millisecond)
	}
}

func isMissing(st slot.State) bool { return st.Presence == slot.Missing }

// waitHung waits until n calls are blocked in the hung Faulty device f.
func waitHung(t testing.TB, f *blockdev.Faulty, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for f.Stats().Hung < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d calls hung in the device after 20 s, want %d", f.Stats().Hung, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// returned runs fn on a goroutine and returns a channel with its error.
func returned(fn func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- fn() }()
	return ch
}

// result waits for the error of a call started with returned, failing the test after
// 20 s.
func result(t testing.TB, what string, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(20 * time.Second):
		t.Fatalf("%s did not return within 20 s", what)
		return nil
	}
}

// pending fails the test if the call started with returned has returned already.
func pending(t testing.TB, what string, ch <-chan error) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("%s returned (%v) while the drive is missing", what, err)
	default:
	}
}

// random returns n random bytes.
func random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// readAll reads [off, off+n) of dev, failing the test on an error.
func readAll(t testing.TB, dev interface {
	ReadAt([]byte, int64) (int, error)
}, off, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := dev.ReadAt(b, off); err != nil {
		t.Fatalf("read %d bytes at %d: %v", n, off, err)
	}
	return b
}

// mustEqual fails the test unless got equals want, naming the first difference.
func mustEqual(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	t.Fatalf("%s: differs from byte %d on (%d and %d bytes)", what, i, len(got), len(want))
}

// fileSum returns the SHA-256 of a file's contents.
func fileSum(t testing.TB, path string) [sha256.Size]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// imageFile writes a drive image of size bytes that carries hdr, and returns its path.
func imageFile(t testing.TB, size int64, hdr []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "drive.img")
	if err := os.WriteFile(p, hdr, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}
