package blockdev

import (
	"fmt"
	"io"
	"sync"
)

// Device is a fixed-size array of bytes with disk semantics.
//
// ReadAt follows io.ReaderAt: a read that reaches past Size returns the bytes before the
// end and io.EOF. WriteAt never grows the device: a write that does not fit entirely
// writes nothing and returns an error that wraps ErrOutOfRange.
type Device interface {
	io.ReaderAt
	io.WriterAt
	// Size is the size of the device in bytes. It does not change while the device is open.
	Size() int64
	// Flush returns when every write that returned before Flush was called is on
	// stable storage.
	Flush() error
	// Close releases the device. Writes not flushed are not guaranteed to be durable.
	Close() error
}

// Trimmer is a Device that can discard a range. After Trim the contents of the range
// are unspecified until written again (a plain drive reads zeroes, an encrypted one
// noise); callers that need zeroes use ZeroWriter.
type Trimmer interface {
	Trim(off, n int64) error
}

// ZeroFlags qualify a WriteZeroes call; they mirror NBD's WRITE_ZEROES flags.
type ZeroFlags uint8

const (
	// ZeroMayUnmap allows the device to deallocate the range (punch a hole) as long as
	// it reads back as zeroes. Without it the range stays allocated (NBD's NO_HOLE).
	ZeroMayUnmap ZeroFlags = 1 << iota
	// ZeroFast asks for the zeroing only if it is cheaper than writing zeroes; a device
	// that cannot do so returns ErrNotFast and changes nothing (NBD's FAST_ZERO).
	ZeroFast
)

// ZeroWriter is a Device that can write zeroes over a range without the caller sending
// a buffer of zeroes. After it returns, reads of the range return zeroes.
type ZeroWriter interface {
	WriteZeroes(off, n int64, flags ZeroFlags) error
}

// FUAWriter is a Device that can make a single write durable more cheaply than a write
// followed by a Flush of everything (NBD's FUA flag). When WriteAtFUA returns, the
// written bytes are on stable storage; other writes need not be.
type FUAWriter interface {
	WriteAtFUA(p []byte, off int64) (int, error)
}

// BlockSizer is a Device with a preferred I/O granularity: requests aligned to it avoid
// read-modify-write cycles in the device. Any offset and length still work.
type BlockSizer interface {
	PreferredBlockSize() int
}

// CheckRange returns an error wrapping ErrOutOfRange unless [off, off+n) lies within a
// device of the given size. A zero-length range at size is valid.
func CheckRange(off, n, size int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("offset %d length %d on a device of %d bytes: %w", off, n, size, ErrOutOfRange)
	}
	return nil
}

// Trim discards [off, off+n) on dev, or returns ErrNotSupported if dev cannot.
func Trim(dev Device, off, n int64) error {
	t, ok := dev.(Trimmer)
	if !ok {
		return ErrNotSupported
	}
	return t.Trim(off, n)
}

// zeroChunk bounds the buffer used when zeroes have to be written as data.
const zeroChunk = 1 << 20

// WriteZeroes zeroes [off, off+n) on dev, through its ZeroWriter capability if it has
// one and otherwise by writing buffers of zeroes (refused with ErrNotFast under ZeroFast).
func WriteZeroes(dev Device, off, n int64, flags ZeroFlags) error {
	if z, ok := dev.(ZeroWriter); ok {
		return z.WriteZeroes(off, n, flags)
	}
	if flags&ZeroFast != 0 {
		return ErrNotFast
	}
	return WriteZeroBuffers(dev, off, n)
}

// zeroBuffer is an aligned buffer of zeroes that is only ever read.
var zeroBuffer = sync.OnceValue(func() []byte { return AlignedBuffer(zeroChunk) })

// WriteZeroBuffers zeroes [off, off+n) on dev by writing buffers of zeroes, at most
// 1 MiB each, from a shared buffer that dev must only read (as io.WriterAt requires).
// After the first, every write starts on a multiple of 1 MiB, so that a device with
// sectors (a power of two up to 1 MiB) sees at most two partial ones, at the ends.
// Devices use it as the fallback of their own WriteZeroes.
func WriteZeroBuffers(dev io.WriterAt, off, n int64) error {
	zero := zeroBuffer()
	for n > 0 {
		c := min(n, zeroChunk-off%zeroChunk)
		if _, err := dev.WriteAt(zero[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}

// WriterAtFunc adapts a function to io.WriterAt, for the WriteZeroBuffers of a device
// that writes through an internal path (one that does not take its locks again).
type WriterAtFunc func(p []byte, off int64) (int, error)

// WriteAt calls f.
func (f WriterAtFunc) WriteAt(p []byte, off int64) (int, error) { return f(p, off) }

// WriteFUA writes p at off on dev and makes it durable before returning, through the
// FUAWriter capability if dev has one and otherwise with a Flush after the write.
func WriteFUA(dev Device, p []byte, off int64) (int, error) {
	if f, ok := dev.(FUAWriter); ok {
		return f.WriteAtFUA(p, off)
	}
	n, err := dev.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	return n, dev.Flush()
}

// PreferredBlockSize returns dev's preferred I/O granularity, or 512 without a BlockSizer.
func PreferredBlockSize(dev Device) int {
	if b, ok := dev.(BlockSizer); ok {
		return b.PreferredBlockSize()
	}
	return 512
}
