package blockcrypt_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/blockdev/blockdevtest"
)

// conformanceKey is the key of the devices under the conformance suite.
var conformanceKey = func() []byte {
	k := make([]byte, blockcrypt.KeySize)
	for i := range k {
		k[i] = byte(i*13 + 5)
	}
	return k
}()

// regionOffset puts the encrypted region behind a header-sized gap, as on a LUKS2 drive
// (scaled down).
const regionOffset = 64 << 10

func closeQuietly(t *testing.T, dev blockdev.Device) {
	t.Cleanup(func() {
		if err := dev.Close(); err != nil && !errors.Is(err, blockdev.ErrClosed) {
			t.Errorf("close: %v", err)
		}
	})
}

func newCrypt(t *testing.T, lower blockdev.Device, sectorSize int, size int64) blockdev.Device {
	t.Helper()
	d, err := blockcrypt.New(lower, blockcrypt.Config{
		Key:           conformanceKey,
		Offset:        regionOffset,
		Size:          size,
		SectorSize:    sectorSize,
		IVTweak:       12345,
		AllowDiscards: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	closeQuietly(t, d)
	return d
}

func TestConformanceMem(t *testing.T) {
	for _, ss := range []int{4096, 512} {
		t.Run(map[int]string{512: "sector512", 4096: "sector4096"}[ss], func(t *testing.T) {
			blockdevtest.Run(t, blockdevtest.Config{
				New: func(t *testing.T, size int64) blockdev.Device {
					return newCrypt(t, blockdev.NewMem(regionOffset+size+8192), ss, size)
				},
			})
		})
	}
}

// TestConformanceFaulty runs the suite over a Faulty device, whose power cut drops what
// was not flushed: what Flush and WriteAtFUA made durable must survive.
func TestConformanceFaulty(t *testing.T) {
	blockdevtest.Run(t, blockdevtest.Config{
		NewReopenable: func(t *testing.T, size int64) (blockdev.Device, blockdevtest.Reopen) {
			f := blockdev.NewFaulty(blockdev.NewMem(regionOffset + size))
			return newCrypt(t, f, 4096, size), func(t *testing.T) blockdev.Device {
				if err := f.PowerCut(); err != nil {
					t.Fatal(err)
				}
				f = blockdev.NewFaulty(f.Lower())
				return newCrypt(t, f, 4096, size)
			}
		},
	})
}

// TestConformanceFile runs the suite over a regular file, reopened from its path.
func TestConformanceFile(t *testing.T) {
	open := func(t *testing.T, path string, size int64) blockdev.Device {
		f, err := blockdev.OpenFile(path, blockdev.FileOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return newCrypt(t, f, 4096, size)
	}
	blockdevtest.Run(t, blockdevtest.Config{
		NewReopenable: func(t *testing.T, size int64) (blockdev.Device, blockdevtest.Reopen) {
			path := filepath.Join(t.TempDir(), "drive.img")
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(path, regionOffset+size); err != nil {
				t.Fatal(err)
			}
			dev := open(t, path, size)
			return dev, func(t *testing.T) blockdev.Device {
				if err := dev.Close(); err != nil {
					t.Fatal(err)
				}
				dev = open(t, path, size)
				return dev
			}
		},
	})
}

// TestConformanceReadOnly runs the read-only suite over a region written with Fill's
// pattern through a writable Device first.
func TestConformanceReadOnly(t *testing.T) {
	blockdevtest.Run(t, blockdevtest.Config{
		New: func(t *testing.T, size int64) blockdev.Device {
			mem := blockdev.NewMem(regionOffset + size)
			w, err := blockcrypt.New(noClose{mem}, blockcrypt.Config{Key: conformanceKey, Offset: regionOffset, IVTweak: 7})
			if err != nil {
				t.Fatal(err)
			}
			p := make([]byte, size)
			blockdevtest.Fill(p, 0)
			if _, err := w.WriteAt(p, 0); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			d, err := blockcrypt.New(mem, blockcrypt.Config{Key: conformanceKey, Offset: regionOffset, IVTweak: 7, ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			closeQuietly(t, d)
			return d
		},
	})
}

// TestFaults: blockcrypt over a Faulty passes every error class of its drive on, asks
// the drive for its capabilities, and trims only where the Config allows discards.
func TestFaults(t *testing.T) {
	for _, allow := range []bool{true, false} {
		t.Run(map[bool]string{true: "discards", false: "nodiscards"}[allow], func(t *testing.T) {
			blockdevtest.RunFaults(t, blockdevtest.FaultConfig{
				Wrap: func(t *testing.T, lower blockdev.Device) blockdev.Device {
					d, err := blockcrypt.New(lower, blockcrypt.Config{Key: conformanceKey, Offset: regionOffset, AllowDiscards: allow})
					if err != nil {
						t.Fatal(err)
					}
					closeQuietly(t, d)
					return d
				},
				PassesTrim: allow,
			})
		})
	}
}

// noClose keeps the lower device open when the Device over it closes.
type noClose struct{ blockdev.Device }

func (noClose) Close() error { return nil }
