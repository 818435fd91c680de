package blockcrypt

import (
	"bytes"
	"errors"
	"strings"
	"syscall"
	"testing"

	"github.com/atrest/atrest/blockdev"
)

func newFaultyDevice(t *testing.T, cfg Config) (*Device, *blockdev.Faulty) {
	t.Helper()
	f := blockdev.NewFaulty(blockdev.NewMem(64 * 4096))
	cfg.Key = testKey(8)
	cfg.Offset = 4096
	d, err := New(f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, f
}

// TestLowerErrors checks that errors of the lower device reach the caller with the lower
// offset, and that a failed read-modify-write changes nothing.
func TestLowerErrors(t *testing.T) {
	d, f := newFaultyDevice(t, Config{})
	data := bytes.Repeat([]byte{3}, int(d.Size()))
	d.WriteAt(data, 0)
	f.Flush()

	remove := f.InjectError(4096+8*4096, 4096, blockdev.FaultRead, nil) // region sector 8
	_, err := d.ReadAt(make([]byte, 3*4096), 7*4096)
	if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "lower offset") {
		t.Errorf("whole-sector read over a bad sector: %v", err)
	}
	if _, err := d.ReadAt(make([]byte, 10), 8*4096+5); !errors.Is(err, syscall.EIO) {
		t.Errorf("partial read of a bad sector: %v", err)
	}
	writes := f.Stats().Writes
	if _, err := d.WriteAt([]byte{9}, 8*4096+5); !errors.Is(err, syscall.EIO) {
		t.Errorf("partial write to a sector that cannot be read: %v", err)
	}
	if f.Stats().Writes != writes {
		t.Error("a read-modify-write whose read failed wrote anyway")
	}
	remove()

	remove = f.InjectError(4096+2*4096, 4096, blockdev.FaultWrite, nil) // region sector 2
	n, err := d.WriteAt(make([]byte, 3*4096), 100)
	if !errors.Is(err, syscall.EIO) || n != 4096-100 {
		t.Errorf("write over a bad sector = %d, %v; want %d and EIO after the head", n, err, 4096-100)
	}
	remove()

	remove = f.FailFlush(nil)
	if err := d.Flush(); !errors.Is(err, syscall.EIO) {
		t.Errorf("Flush: %v", err)
	}
	remove()
	if err := d.Flush(); err != nil {
		t.Errorf("Flush after the fault: %v", err)
	}
}

// TestFUA checks that WriteAtFUA makes every lower write it does a FUA write, partial
// sectors included, so that it survives a power cut without Flush; a plain write does not.
func TestFUA(t *testing.T) {
	d, f := newFaultyDevice(t, Config{})
	fua := bytes.Repeat([]byte{5}, 3*4096)
	if _, err := d.WriteAtFUA(fua, 1000); err != nil { // head, body and tail
		t.Fatal(err)
	}
	if s := f.Stats(); s.FUAWrites != 3 || s.Writes != 0 {
		t.Errorf("lower writes: %d FUA and %d plain, want 3 FUA (head, body, tail) and no plain", s.FUAWrites, s.Writes)
	}
	if _, err := d.WriteAt(bytes.Repeat([]byte{6}, 4096), 10*4096); err != nil {
		t.Fatal(err)
	}
	if err := f.PowerCut(); err != nil {
		t.Fatal(err)
	}
	after, err := New(noCloseDevice{f.Lower()}, Config{Key: testKey(8), Offset: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer after.Close()
	got := make([]byte, len(fua))
	after.ReadAt(got, 1000)
	if !bytes.Equal(got, fua) {
		t.Error("a FUA write did not survive a power cut")
	}
	after.ReadAt(got[:4096], 10*4096)
	if bytes.Equal(got[:4096], bytes.Repeat([]byte{6}, 4096)) {
		t.Error("an unflushed plain write survived a power cut (the Faulty model is not doing its job)")
	}
}

// TestPassDown checks which calls reach the lower device as what.
func TestPassDown(t *testing.T) {
	d, f := newFaultyDevice(t, Config{})
	if err := d.WriteZeroes(0, 8*4096, blockdev.ZeroMayUnmap); err != nil {
		t.Fatal(err)
	}
	if s := f.Stats(); s.WriteZeroes != 0 || s.Trims != 0 || s.Writes == 0 {
		t.Errorf("WriteZeroes reached the lower device as %d WriteZeroes, %d Trims, %d writes; want writes only", s.WriteZeroes, s.Trims, s.Writes)
	}
	if err := d.Trim(0, 4096); !errors.Is(err, blockdev.ErrNotSupported) || f.Stats().Trims != 0 {
		t.Errorf("Trim without AllowDiscards: %v, %d lower trims", err, f.Stats().Trims)
	}
	flushes := f.Stats().Flushes
	d.Flush()
	if f.Stats().Flushes != flushes+1 {
		t.Error("Flush did not reach the lower device")
	}

	d, f = newFaultyDevice(t, Config{AllowDiscards: true})
	if err := d.Trim(100, 3*4096); err != nil {
		t.Fatal(err)
	}
	if f.Stats().Trims != 1 {
		t.Errorf("%d lower trims, want 1", f.Stats().Trims)
	}
}

type noCloseDevice struct{ blockdev.Device }

func (noCloseDevice) Close() error { return nil }

// TestWriteZeroesChunks: a WriteZeroes over several MiB at an offset inside a sector
// reads and rewrites only its two partial sectors: the chunks after the first start on
// sector boundaries.
func TestWriteZeroesChunks(t *testing.T) {
	f := blockdev.NewFaulty(blockdev.NewMem(4096 + 8<<20))
	d, err := New(f, Config{Key: testKey(8), Offset: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.WriteZeroes(512, 5<<20, 0); err != nil {
		t.Fatal(err)
	}
	if s := f.Stats(); s.Reads != 2 {
		t.Errorf("%d lower reads for the partial sectors, want 2 (head and tail)", s.Reads)
	}
	got := make([]byte, 5<<20)
	if _, err := d.ReadAt(got, 512); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, len(got))) {
		t.Error("the range does not read back as zeroes")
	}
}

// TestLowerChangeErrors: a lower device failing a Trim or the writes of a WriteZeroes
// fails the call with the lower device's error.
func TestLowerChangeErrors(t *testing.T) {
	d, f := newFaultyDevice(t, Config{AllowDiscards: true})
	remove := f.InjectError(4096+2*4096, 4096, blockdev.FaultWrite, nil) // region sector 2
	defer remove()
	if err := d.Trim(0, 4*4096); !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "lower offset") {
		t.Errorf("trim over a bad sector: %v", err)
	}
	if err := d.WriteZeroes(0, 4*4096, 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("zeroes over a bad sector: %v", err)
	}
}
