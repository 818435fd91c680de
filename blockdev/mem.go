package blockdev

import (
	"io"
	"sync"
)

// Mem is a Device held in memory, for tests. Its writes are durable as soon as they
// return, so Flush does nothing; wrap it in Faulty to test durability.
type Mem struct {
	mu     sync.RWMutex
	data   []byte
	closed bool
}

var (
	_ Device       = (*Mem)(nil)
	_ Trimmer      = (*Mem)(nil)
	_ ZeroWriter   = (*Mem)(nil)
	_ CapsReporter = (*Mem)(nil)
)

// NewMem returns a zero-filled memory device of size bytes.
func NewMem(size int64) *Mem {
	return &Mem{data: make([]byte, size)}
}

// Size returns the size of the device.
func (m *Mem) Size() int64 { return int64(len(m.data)) }

// Caps says that a Mem trims and zeroes (fast) by itself; its writes need no FUA, as
// they are durable when they return.
func (m *Mem) Caps() Caps {
	return Caps{Trim: true, Zeroes: true, FastZero: true, BlockSize: 512}
}

// ReadAt reads len(p) bytes at off; see Device for the behaviour at the end.
func (m *Mem) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, CheckRange(off, int64(len(p)), m.Size())
	}
	if off >= m.Size() {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// WriteAt writes p at off; a write that does not fit writes nothing.
func (m *Mem) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, ErrClosed
	}
	if err := CheckRange(off, int64(len(p)), m.Size()); err != nil {
		return 0, err
	}
	return copy(m.data[off:], p), nil
}

// Trim zeroes the range.
func (m *Mem) Trim(off, n int64) error { return m.WriteZeroes(off, n, ZeroMayUnmap) }

// WriteZeroes zeroes the range; it is always fast.
func (m *Mem) WriteZeroes(off, n int64, _ ZeroFlags) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if err := CheckRange(off, n, m.Size()); err != nil {
		return err
	}
	clear(m.data[off : off+n])
	return nil
}

// Flush does nothing: a memory device has no volatile cache.
func (m *Mem) Flush() error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return ErrClosed
	}
	return nil
}

// Close marks the device closed; later calls fail with ErrClosed.
func (m *Mem) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	m.closed = true
	return nil
}
