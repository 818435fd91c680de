package blockdevtest_test

import (
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/blockdev/blockdevtest"
)

// The suite must catch broken devices: each one below has one bug, and the subtests named
// here, run on it in a child process (so that their failure does not fail this test),
// must fail.
var brokenDevices = map[string]struct {
	cfg     func() blockdevtest.Config
	failing []string // subtests that must fail
}{
	"NoEOF":          {memConfig(func(m *blockdev.Mem) blockdev.Device { return noEOF{m} }), []string{"End"}},
	"GrowsOnWrite":   {memConfig(func(m *blockdev.Mem) blockdev.Device { return partialWrite{m} }), []string{"OutOfRange"}},
	"LosesWrites":    {memConfig(func(m *blockdev.Mem) blockdev.Device { return &dropsWrites{Mem: m} }), []string{"Boundaries", "Model"}},
	"UnlockedRMW":    {memConfig(func(m *blockdev.Mem) blockdev.Device { return unlockedRMW{m} }), []string{"ConcurrentDisjoint"}},
	"TornSectors":    {memConfig(func(m *blockdev.Mem) blockdev.Device { return tornWrites{m} }), []string{"ConcurrentOverlapping"}},
	"ZeroEdges":      {memConfig(func(m *blockdev.Mem) blockdev.Device { return zeroInner{m} }), []string{"WriteZeroes"}},
	"TrimTooMuch":    {memConfig(func(m *blockdev.Mem) blockdev.Device { return trimTooMuch{m} }), []string{"Trim"}},
	"OpenAfterClose": {memConfig(func(m *blockdev.Mem) blockdev.Device { return openAfterClose{m} }), []string{"Closed"}},
	"FlushIgnored":   {faultyConfig(func(f *blockdev.Faulty) blockdev.Device { return flushIgnored{f} }), []string{"Reopen"}},
	"FUANotDurable":  {faultyConfig(func(f *blockdev.Faulty) blockdev.Device { return lazyFUA{f} }), []string{"Reopen"}},
	"ClaimsTrim":     {memConfig(func(m *blockdev.Mem) blockdev.Device { return cannotTrim{m} }), []string{"Caps"}},
	"HidesFastZero":  {memConfig(func(m *blockdev.Mem) blockdev.Device { return hidesFastZero{m} }), []string{"Caps"}},
}

func memConfig(wrap func(*blockdev.Mem) blockdev.Device) func() blockdevtest.Config {
	return func() blockdevtest.Config {
		return blockdevtest.Config{
			New: func(t *testing.T, size int64) blockdev.Device {
				m := blockdev.NewMem(size)
				t.Cleanup(func() { m.Close() })
				return wrap(m)
			},
			TrimZeroes: true,
		}
	}
}

func faultyConfig(wrap func(*blockdev.Faulty) blockdev.Device) func() blockdevtest.Config {
	newFaulty := func(t *testing.T, lower blockdev.Device) *blockdev.Faulty {
		f := blockdev.NewFaulty(lower)
		t.Cleanup(func() { f.Close() })
		return f
	}
	return func() blockdevtest.Config {
		return blockdevtest.Config{
			NewReopenable: func(t *testing.T, size int64) (blockdev.Device, blockdevtest.Reopen) {
				f := newFaulty(t, blockdev.NewMem(size))
				return wrap(f), func(t *testing.T) blockdev.Device {
					if err := f.PowerCut(); err != nil {
						t.Fatal(err)
					}
					f = newFaulty(t, f.Lower())
					return wrap(f)
				}
			},
			TrimZeroes: true,
		}
	}
}

// noEOF returns nil instead of io.EOF for reads that reach past the end.
type noEOF struct{ *blockdev.Mem }

func (d noEOF) ReadAt(p []byte, off int64) (int, error) {
	n, err := d.Mem.ReadAt(p, off)
	if err == io.EOF && n > 0 {
		err = nil
	}
	return n, err
}

// partialWrite writes what fits of a write that reaches past the end.
type partialWrite struct{ *blockdev.Mem }

func (d partialWrite) WriteAt(p []byte, off int64) (int, error) {
	if off >= 0 && off < d.Size() && off+int64(len(p)) > d.Size() {
		n, _ := d.Mem.WriteAt(p[:d.Size()-off], off)
		return n, blockdev.ErrOutOfRange
	}
	return d.Mem.WriteAt(p, off)
}

// dropsWrites silently loses every 29th write.
type dropsWrites struct {
	*blockdev.Mem
	mu sync.Mutex
	n  int
}

func (d *dropsWrites) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	d.n++
	drop := d.n%29 == 0
	d.mu.Unlock()
	if drop && len(p) > 0 && blockdev.CheckRange(off, int64(len(p)), d.Size()) == nil {
		return len(p), nil
	}
	return d.Mem.WriteAt(p, off)
}

// unlockedRMW rewrites the whole 4096-byte blocks that a write touches, from a copy read
// before, without a lock: a neighbour's write to the same block in between is lost.
type unlockedRMW struct{ *blockdev.Mem }

func (d unlockedRMW) WriteAt(p []byte, off int64) (int, error) {
	if err := blockdev.CheckRange(off, int64(len(p)), d.Size()); err != nil || len(p) == 0 {
		return d.Mem.WriteAt(p, off)
	}
	start := off &^ 4095
	end := min((off+int64(len(p))+4095)&^4095, d.Size())
	buf := make([]byte, end-start)
	if _, err := d.Mem.ReadAt(buf, start); err != nil && err != io.EOF {
		return 0, err
	}
	time.Sleep(50 * time.Microsecond)
	copy(buf[off-start:], p)
	if _, err := d.Mem.WriteAt(buf, start); err != nil {
		return 0, err
	}
	return len(p), nil
}

// tornWrites writes the first half of every 512-byte sector, then the rest.
type tornWrites struct{ *blockdev.Mem }

func (d tornWrites) WriteAt(p []byte, off int64) (int, error) {
	if err := blockdev.CheckRange(off, int64(len(p)), d.Size()); err != nil || off%512 != 0 || len(p)%512 != 0 {
		return d.Mem.WriteAt(p, off)
	}
	for half := range 2 {
		for s := 0; s < len(p); s += 512 {
			q := p[s+half*256 : s+half*256+256]
			if _, err := d.Mem.WriteAt(q, off+int64(s+half*256)); err != nil {
				return 0, err
			}
		}
		time.Sleep(time.Duration(rand.IntN(200)) * time.Microsecond)
	}
	return len(p), nil
}

// zeroInner zeroes only the 512-byte sectors inside the range.
type zeroInner struct{ *blockdev.Mem }

func (d zeroInner) WriteZeroes(off, n int64, flags blockdev.ZeroFlags) error {
	if blockdev.CheckRange(off, n, d.Size()) != nil {
		return d.Mem.WriteZeroes(off, n, flags)
	}
	a, b := (off+511)&^511, (off+n)&^511
	if a >= b {
		return nil
	}
	return d.Mem.WriteZeroes(a, b-a, flags)
}

// trimTooMuch trims one byte more than asked where it can.
type trimTooMuch struct{ *blockdev.Mem }

func (d trimTooMuch) Trim(off, n int64) error {
	if blockdev.CheckRange(off, n+1, d.Size()) == nil {
		n++
	}
	return d.Mem.Trim(off, n)
}

// openAfterClose keeps reading after Close.
type openAfterClose struct{ *blockdev.Mem }

func (d openAfterClose) ReadAt(p []byte, off int64) (int, error) {
	n, err := d.Mem.ReadAt(p, off)
	if errors.Is(err, blockdev.ErrClosed) {
		clear(p)
		return len(p), nil
	}
	return n, err
}

// flushIgnored reports success without writing its cache back.
type flushIgnored struct{ *blockdev.Faulty }

func (flushIgnored) Flush() error { return nil }

// lazyFUA makes FUA writes plain cached writes.
type lazyFUA struct{ *blockdev.Faulty }

func (d lazyFUA) WriteAtFUA(p []byte, off int64) (int, error) { return d.WriteAt(p, off) }

// cannotTrim refuses every Trim while its Caps (Mem's) say Trim.
type cannotTrim struct{ *blockdev.Mem }

func (cannotTrim) Trim(off, n int64) error { return blockdev.ErrNotSupported }

// hidesFastZero zeroes fast while its Caps say it cannot.
type hidesFastZero struct{ *blockdev.Mem }

func (d hidesFastZero) Caps() blockdev.Caps {
	c := d.Mem.Caps()
	c.FastZero = false
	return c
}

// TestBrokenDevice runs the suite on the broken device named by
// BLOCKDEVTEST_BROKEN; TestSuiteCatchesBrokenDevices runs it in a child process.
func TestBrokenDevice(t *testing.T) {
	name := os.Getenv("BLOCKDEVTEST_BROKEN")
	if name == "" {
		t.Skip("run by TestSuiteCatchesBrokenDevices")
	}
	b, ok := brokenDevices[name]
	if !ok {
		t.Fatalf("no broken device %q", name)
	}
	blockdevtest.Run(t, b.cfg())
}

func TestSuiteCatchesBrokenDevices(t *testing.T) {
	failing := map[string][]string{}
	for name, b := range brokenDevices {
		failing[name] = b.failing
	}
	catchesBroken(t, "TestBrokenDevice", "BLOCKDEVTEST_BROKEN", failing)
}

// catchesBroken runs test in a child process once per broken subject (named in the
// environment variable env), and checks that the subtests listed for it fail.
func catchesBroken(t *testing.T, test, env string, failing map[string][]string) {
	names := make([]string, 0, len(failing))
	for name := range failing {
		names = append(names, name)
	}
	sort.Strings(names)
	failRE := regexp.MustCompile(`--- FAIL: ` + test + `/(\w+)`)
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			only := "^" + test + "$/^(" + strings.Join(failing[name], "|") + ")$"
			cmd := exec.Command(os.Args[0], "-test.run="+only, "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), env+"="+name)
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			if !errors.As(err, &exit) {
				t.Fatalf("the suite passed on %s (or did not run: %v):\n%s", name, err, out)
			}
			failed := map[string]bool{}
			for _, m := range failRE.FindAllStringSubmatch(string(out), -1) {
				failed[m[1]] = true
			}
			for _, want := range failing[name] {
				if !failed[want] {
					t.Errorf("subtest %s did not fail; failures: %v\n%s", want, failed, out)
				}
			}
		})
	}
}

// The fault suite must catch broken layers: each one below wraps its lower device with
// one bug, and the subtests named here must fail (in a child process, as above).
var brokenLayers = map[string]struct {
	wrap    func(lower blockdev.Device) blockdev.Device
	failing []string
}{
	"LosesClasses":  {func(l blockdev.Device) blockdev.Device { return losesClasses{l} }, []string{"MediumRead", "MediumWrite", "MediumFlush", "Gone"}},
	"ClaimsTrim":    {func(l blockdev.Device) blockdev.Device { return claimsTrim{l} }, []string{"Trim"}},
	"HidesReadOnly": {func(l blockdev.Device) blockdev.Device { return hidesReadOnly{l} }, []string{"ReadOnly"}},
}

// losesClasses reports the errors of its lower device by their text only.
type losesClasses struct{ blockdev.Device }

func flatten(err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	return errors.New(err.Error())
}

func (d losesClasses) ReadAt(p []byte, off int64) (int, error) {
	n, err := d.Device.ReadAt(p, off)
	return n, flatten(err)
}

func (d losesClasses) WriteAt(p []byte, off int64) (int, error) {
	n, err := d.Device.WriteAt(p, off)
	return n, flatten(err)
}

func (d losesClasses) Flush() error { return flatten(d.Device.Flush()) }

// claimsTrim says Trim whatever its lower device can do.
type claimsTrim struct{ blockdev.Device }

func (d claimsTrim) Caps() blockdev.Caps {
	c := blockdev.CapsOf(d.Device)
	c.Trim = true
	return c
}

func (d claimsTrim) Trim(off, n int64) error { return blockdev.Trim(d.Device, off, n) }

// hidesReadOnly does not pass on that its lower device is read-only.
type hidesReadOnly struct{ blockdev.Device }

func (d hidesReadOnly) Caps() blockdev.Caps {
	c := blockdev.CapsOf(d.Device)
	c.ReadOnly = false
	return c
}

// TestBrokenLayer runs the fault suite on the broken layer named by
// BLOCKDEVTEST_BROKEN_LAYER; TestFaultSuiteCatchesBrokenLayers runs it in a child
// process.
func TestBrokenLayer(t *testing.T) {
	name := os.Getenv("BLOCKDEVTEST_BROKEN_LAYER")
	if name == "" {
		t.Skip("run by TestFaultSuiteCatchesBrokenLayers")
	}
	b, ok := brokenLayers[name]
	if !ok {
		t.Fatalf("no broken layer %q", name)
	}
	blockdevtest.RunFaults(t, blockdevtest.FaultConfig{
		Wrap: func(t *testing.T, lower blockdev.Device) blockdev.Device {
			dev := b.wrap(lower)
			t.Cleanup(func() { dev.Close() })
			return dev
		},
		PassesTrim: true,
	})
}

func TestFaultSuiteCatchesBrokenLayers(t *testing.T) {
	failing := map[string][]string{}
	for name, b := range brokenLayers {
		failing[name] = b.failing
	}
	catchesBroken(t, "TestBrokenLayer", "BLOCKDEVTEST_BROKEN_LAYER", failing)
}
