package blockdev_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/blockdev/blockdevtest"
	"github.com/atrest/atrest/internal/testutil"
)

// closeQuietly is the cleanup of a device the suite may have closed already.
func closeQuietly(t *testing.T, dev blockdev.Device) {
	t.Cleanup(func() {
		if err := dev.Close(); err != nil && !errors.Is(err, blockdev.ErrClosed) {
			t.Errorf("close: %v", err)
		}
	})
}

func TestMemConformance(t *testing.T) {
	blockdevtest.Run(t, blockdevtest.Config{
		New: func(t *testing.T, size int64) blockdev.Device {
			m := blockdev.NewMem(size)
			closeQuietly(t, m)
			return m
		},
		TrimZeroes: true,
	})
}

// newFaultyMem returns a Faulty over a fresh Mem.
func newFaultyMem(t *testing.T, size int64) blockdev.Device {
	f := blockdev.NewFaulty(blockdev.NewMem(size))
	closeQuietly(t, f)
	return f
}

// faultyMemAfterCuts returns a NewReopenable of Faults over fresh Mems, whose reopen
// makes cut the power of the device and returns a new Faulty over what it kept.
func faultyMemAfterCuts(cut func(f *blockdev.Faulty) error) func(*testing.T, int64) (blockdev.Device, blockdevtest.Reopen) {
	return func(t *testing.T, size int64) (blockdev.Device, blockdevtest.Reopen) {
		f := newFaultyMem(t, size).(*blockdev.Faulty)
		return f, func(t *testing.T) blockdev.Device {
			if err := cut(f); err != nil {
				t.Fatal(err)
			}
			f = blockdev.NewFaulty(f.Lower())
			closeQuietly(t, f)
			return f
		}
	}
}

func TestFaultyMemConformance(t *testing.T) {
	blockdevtest.Run(t, blockdevtest.Config{
		// A restart after a power cut: only what was durable is left.
		NewReopenable: faultyMemAfterCuts((*blockdev.Faulty).PowerCut),
		TrimZeroes:    true,
	})
}

func TestFaultyMemConformanceRandomPowerCut(t *testing.T) {
	seed := uint64(0)
	blockdevtest.Run(t, blockdevtest.Config{
		// A power cut that keeps part of the cache must still keep everything durable.
		NewReopenable: faultyMemAfterCuts(func(f *blockdev.Faulty) error {
			seed++
			return f.PowerCutRandom(seed)
		}),
		TrimZeroes: true,
	})
}

// fileConfig returns a suite configuration for Files in dir opened with opts.
func fileConfig(dir string, opts blockdev.FileOptions) blockdevtest.Config {
	return pathConfig(opts, func(t *testing.T, size int64) string { return newSparseFile(t, dir, size) })
}

// pathConfig returns a suite configuration for Files opened with opts on the paths that
// newPath creates, which Reopen closes and opens again.
func pathConfig(opts blockdev.FileOptions, newPath func(t *testing.T, size int64) string) blockdevtest.Config {
	open := func(t *testing.T, path string) blockdev.Device {
		f, err := blockdev.OpenFile(path, opts)
		if err != nil {
			t.Fatal(err)
		}
		closeQuietly(t, f)
		return f
	}
	return blockdevtest.Config{
		NewReopenable: func(t *testing.T, size int64) (blockdev.Device, blockdevtest.Reopen) {
			path := newPath(t, size)
			dev := open(t, path)
			return dev, func(t *testing.T) blockdev.Device {
				if err := dev.Close(); err != nil {
					t.Fatal(err)
				}
				dev = open(t, path)
				return dev
			}
		},
		TrimZeroes: true,
	}
}

// newSparseFile creates a file of size bytes in dir (a fresh temporary directory when
// dir is empty) and returns its path.
func newSparseFile(t *testing.T, dir string, size int64) string {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	f, err := os.CreateTemp(dir, "drive-*.img")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(f.Name()) })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

func TestFileConformance(t *testing.T) {
	blockdevtest.Run(t, fileConfig("", blockdev.FileOptions{}))
}

func TestFileReadOnlyConformance(t *testing.T) {
	blockdevtest.Run(t, blockdevtest.Config{
		New: func(t *testing.T, size int64) blockdev.Device {
			p := make([]byte, size)
			blockdevtest.Fill(p, 0)
			path := filepath.Join(t.TempDir(), "ro.img")
			if err := os.WriteFile(path, p, 0o600); err != nil {
				t.Fatal(err)
			}
			f, err := blockdev.OpenFile(path, blockdev.FileOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			closeQuietly(t, f)
			return f
		},
	})
}

func TestFileDirectConformance(t *testing.T) {
	blockdevtest.Run(t, fileConfig(blockdev.DirectDir(t), blockdev.FileOptions{Direct: true}))
}

// newLoopDevice attaches a loop device over a fresh file of size bytes and returns its
// path; it is detached when the test ends.
func newLoopDevice(t *testing.T, size int64) (dev, backing string) {
	t.Helper()
	testutil.Root(t)
	losetup := testutil.Tool(t, "losetup")
	backing = newSparseFile(t, "", size)
	for attempt := 1; ; attempt++ {
		out, err := exec.Command(losetup, "--find", "--show", backing).CombinedOutput()
		if err != nil {
			t.Fatalf("losetup --find --show %s: %v: %s", backing, err, out)
		}
		dev = strings.TrimSpace(string(out))
		detach := func() {
			if out, err := exec.Command(losetup, "--detach", dev).CombinedOutput(); err != nil {
				t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
			}
		}
		// A 0 written to queue/discard_max_bytes turns discards off on a loop device
		// for good: it outlives the detach, and this kernel refuses to raise it again
		// (EINVAL). Such a device, left by an earlier user, is removed, and another
		// one taken.
		if sysfsInt(t, dev, "discard_max_bytes") > 0 || sysfsInt(t, dev, "discard_max_hw_bytes") == 0 {
			t.Cleanup(detach)
			return dev, backing
		}
		detach()
		if attempt == 3 {
			t.Fatalf("losetup keeps giving %s, whose discards an earlier user turned off", dev)
		}
		t.Logf("%s has discards turned off by an earlier user: removing it", dev)
		removeLoopDevice(t, dev)
	}
}

// removeLoopDevice deletes the detached loop device dev (LOOP_CTL_REMOVE), waiting while
// the kernel still finishes the detach (EBUSY).
func removeLoopDevice(t *testing.T, dev string) {
	t.Helper()
	n, err := strconv.Atoi(strings.TrimPrefix(dev, "/dev/loop"))
	if err != nil {
		t.Fatalf("loop device %s: %v", dev, err)
	}
	ctl, err := os.Open("/dev/loop-control")
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, ctl.Fd(), unix.LOOP_CTL_REMOVE, uintptr(n))
		switch {
		case e == 0, e == unix.ENODEV, e == unix.ENXIO:
			return
		case e == unix.EBUSY && time.Now().Before(deadline):
			time.Sleep(10 * time.Millisecond)
		default:
			t.Fatalf("LOOP_CTL_REMOVE %s: %v", dev, e)
		}
	}
}

// loopConfig returns a suite configuration for Files over fresh loop devices.
func loopConfig(opts blockdev.FileOptions) blockdevtest.Config {
	cfg := pathConfig(opts, func(t *testing.T, size int64) string {
		dev, _ := newLoopDevice(t, size)
		return dev
	})
	// A discard on a real drive need not zero, so the suite does not count on it,
	// although a loop device over a file does.
	cfg.TrimZeroes = false
	return cfg
}

func TestFileLoopConformance(t *testing.T) {
	blockdevtest.Run(t, loopConfig(blockdev.FileOptions{}))
}

func TestFileLoopDirectConformance(t *testing.T) {
	blockdevtest.Run(t, loopConfig(blockdev.FileOptions{Direct: true}))
}

func TestFaultyFileConformance(t *testing.T) {
	cfg := fileConfig("", blockdev.FileOptions{})
	newFile := cfg.NewReopenable
	cfg.NewReopenable = func(t *testing.T, size int64) (blockdev.Device, blockdevtest.Reopen) {
		file, reopenFile := newFile(t, size)
		f := blockdev.NewFaulty(file)
		closeQuietly(t, f)
		return f, func(t *testing.T) blockdev.Device {
			if err := f.PowerCut(); err != nil {
				t.Fatal(err)
			}
			f = blockdev.NewFaulty(reopenFile(t))
			closeQuietly(t, f)
			return f
		}
	}
	blockdevtest.Run(t, cfg)
}

// TestBoundedConformance: a Bounded over a device that never hangs is a plain Device,
// durability included.
func TestBoundedConformance(t *testing.T) {
	newFaulty := faultyMemAfterCuts((*blockdev.Faulty).PowerCut)
	blockdevtest.Run(t, blockdevtest.Config{
		NewReopenable: func(t *testing.T, size int64) (blockdev.Device, blockdevtest.Reopen) {
			f, reopen := newFaulty(t, size)
			b := blockdev.Bound(f, time.Minute)
			closeQuietly(t, b)
			return b, func(t *testing.T) blockdev.Device {
				b := blockdev.Bound(reopen(t), time.Minute)
				closeQuietly(t, b)
				return b
			}
		},
		TrimZeroes: true,
	})
}

// TestFaults: Faulty's own errors have the classes that RunFaults asks of every layer
// over it, and a Bounded passes every class of the device below on.
func TestFaults(t *testing.T) {
	for name, wrap := range map[string]func(blockdev.Device) blockdev.Device{
		"Faulty":  func(lower blockdev.Device) blockdev.Device { return lower },
		"Bounded": func(lower blockdev.Device) blockdev.Device { return blockdev.Bound(lower, time.Minute) },
	} {
		t.Run(name, func(t *testing.T) {
			blockdevtest.RunFaults(t, blockdevtest.FaultConfig{
				Wrap: func(t *testing.T, lower blockdev.Device) blockdev.Device {
					dev := wrap(lower)
					closeQuietly(t, dev)
					return dev
				},
				PassesTrim: true,
			})
		})
	}
}
