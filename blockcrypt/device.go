package blockcrypt

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/atrest/atrest/blockdev"
)

// Config describes an encrypted region of a lower device.
type Config struct {
	// Key is the 64-byte XTS-AES-256 key, key1 || key2, with key1 != key2. The Device
	// keeps its own copy; the caller may zero Key once New returns.
	Key []byte
	// Offset is where the encrypted region starts on the lower device, a multiple of
	// the sector size (the LUKS2 data segment offset).
	Offset int64
	// Size is the length of the region in bytes, a multiple of the sector size; 0 means
	// to the end of the lower device, rounded down to a whole sector.
	Size int64
	// SectorSize is 4096 (the default, when 0) or 512.
	SectorSize int
	// IVTweak is the IV of the region's first sector, in 512-byte units (LUKS2
	// iv_tweak). The sector at region offset o has IV IVTweak + o/512.
	IVTweak uint64
	// AllowDiscards passes Trim down to the lower device (the LUKS2 header's
	// allow-discards flag); without it Trim fails with blockdev.ErrNotSupported, so that
	// the lower device never learns which sectors are unused. This is atrest's one
	// place for the policy "discards off by default": every layer above learns it from
	// Caps.
	AllowDiscards bool
	// ReadOnly refuses every change with blockdev.ErrReadOnly.
	ReadOnly bool
}

var (
	// ErrSectorSize is returned for a sector size other than 512 or 4096.
	ErrSectorSize = errors.New("sector size must be 512 or 4096")
	// ErrRegion is returned for an encrypted region that is misaligned, empty or does
	// not fit in the lower device.
	ErrRegion = errors.New("bad encrypted region")
)

// Device is a blockdev.Device whose contents are stored encrypted in a region of a lower
// device. Reads and writes of any offset and length work. The whole sectors of a request
// go straight through: a read with one lower read into the caller's buffer, decrypted
// there; a write encrypted into pooled buffers (never in the caller's) and written with
// one lower write per MiB. A partial sector at either end is a read-modify-write under
// its sector lock; see locks.go for what concurrent calls on the same sector can expect.
//
// Errors of the lower device keep their class (blockdev.ErrGone, ErrMedium, ...),
// wrapped with the lower offset.
//
// It is safe for concurrent use; Close waits for the calls in progress.
type Device struct {
	lower         blockdev.Device
	c             *Cipher
	l             layout
	allowDiscards bool
	readOnly      bool
	locks         lockTable

	// mu is held shared by every call and exclusively by Close, so that the Cipher is
	// never used after its keys are zeroed.
	mu     sync.RWMutex
	closed bool
}

var (
	_ blockdev.Device       = (*Device)(nil)
	_ blockdev.Trimmer      = (*Device)(nil)
	_ blockdev.ZeroWriter   = (*Device)(nil)
	_ blockdev.FUAWriter    = (*Device)(nil)
	_ blockdev.BlockSizer   = (*Device)(nil)
	_ blockdev.CapsReporter = (*Device)(nil)
)

// New returns a Device over the region of lower that cfg describes. The Device owns
// lower from then on: its Close closes lower. When New fails, lower stays open and the
// caller's.
func New(lower blockdev.Device, cfg Config) (*Device, error) {
	return newDevice(lower, cfg, bestImplementation())
}

func newDevice(lower blockdev.Device, cfg Config, impl *implementation) (*Device, error) {
	if lower == nil {
		return nil, errors.New("blockcrypt: no lower device")
	}
	size, err := cfg.RegionSize(lower.Size())
	if err != nil {
		return nil, err
	}
	ss := int64(cfg.SectorSize)
	if ss == 0 {
		ss = 4096
	}
	c, err := newCipherWith(impl, cfg.Key)
	if err != nil {
		return nil, fmt.Errorf("blockcrypt: %w", err)
	}
	return &Device{
		lower:         lower,
		c:             c,
		l:             layout{base: cfg.Offset, size: size, sectorSize: ss, ivTweak: cfg.IVTweak},
		allowDiscards: cfg.AllowDiscards,
		readOnly:      cfg.ReadOnly,
	}, nil
}

// RegionSize checks the sector size and the region of cfg against a lower device of
// lowerSize bytes, as New does, and returns the size of the region. Callers that report
// on a drive without opening it (a status) use it to apply New's checks.
func (cfg Config) RegionSize(lowerSize int64) (int64, error) {
	ss := int64(cfg.SectorSize)
	if ss == 0 {
		ss = 4096
	}
	if ss != 512 && ss != 4096 {
		return 0, fmt.Errorf("blockcrypt: sector size %d: %w", cfg.SectorSize, ErrSectorSize)
	}
	if cfg.Offset < 0 || cfg.Offset%ss != 0 {
		return 0, fmt.Errorf("blockcrypt: region offset %d is not a multiple of the %d-byte sector size: %w", cfg.Offset, ss, ErrRegion)
	}
	if cfg.Size < 0 || cfg.Size%ss != 0 {
		return 0, fmt.Errorf("blockcrypt: region size %d is not a multiple of the %d-byte sector size: %w", cfg.Size, ss, ErrRegion)
	}
	if cfg.Offset > lowerSize {
		return 0, fmt.Errorf("blockcrypt: region offset %d is past the end of the %d-byte lower device: %w", cfg.Offset, lowerSize, ErrRegion)
	}
	size := cfg.Size
	if size == 0 {
		size = (lowerSize - cfg.Offset) / ss * ss
		if size == 0 {
			return 0, fmt.Errorf("blockcrypt: no whole %d-byte sector after offset %d on the %d-byte lower device: %w", ss, cfg.Offset, lowerSize, ErrRegion)
		}
	}
	if size > lowerSize-cfg.Offset {
		return 0, fmt.Errorf("blockcrypt: region of %d bytes at offset %d does not fit in the %d-byte lower device: %w", size, cfg.Offset, lowerSize, ErrRegion)
	}
	return size, nil
}

// Size returns the size of the encrypted region.
func (d *Device) Size() int64 { return d.l.size }

// PreferredBlockSize returns the sector size: aligned requests avoid read-modify-write.
func (d *Device) PreferredBlockSize() int { return int(d.l.sectorSize) }

// Caps reports what the encrypted device can do: trim only where the Config allows
// discards and the lower device can trim; zero by itself, but never fast (zeroes must be
// encrypted and written); FUA writes that are as cheap as the lower device's.
func (d *Device) Caps() blockdev.Caps {
	lower := blockdev.CapsOf(d.lower)
	if d.readOnly || lower.ReadOnly {
		return blockdev.Caps{ReadOnly: true, BlockSize: int(d.l.sectorSize)}
	}
	return blockdev.Caps{
		Trim:      d.allowDiscards && lower.Trim,
		Zeroes:    true,
		FUA:       lower.FUA,
		BlockSize: int(d.l.sectorSize),
	}
}

// Implementation returns the name of the XTS implementation in use.
func (d *Device) Implementation() string { return d.c.Implementation() }

// begin starts a call; it fails once the Device is closed.
func (d *Device) begin() error {
	d.mu.RLock()
	if d.closed {
		d.mu.RUnlock()
		return blockdev.ErrClosed
	}
	return nil
}

func (d *Device) end() { d.mu.RUnlock() }

// ReadAt reads and decrypts len(p) bytes at off; see blockdev.Device for the behaviour at
// the end.
func (d *Device) ReadAt(p []byte, off int64) (int, error) {
	if err := d.begin(); err != nil {
		return 0, err
	}
	defer d.end()
	if off < 0 {
		return 0, blockdev.CheckRange(off, int64(len(p)), d.l.size)
	}
	if off >= d.l.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > d.l.size-off {
		p, eof = p[:d.l.size-off], io.EOF
	}
	head, body, tail := d.l.split(off, int64(len(p)))
	done := 0
	if head.n > 0 {
		if err := d.readPartial(p[:head.n], head.off); err != nil {
			return done, err
		}
		done += int(head.n)
	}
	if body.n > 0 {
		if err := d.readWhole(p[done:done+int(body.n)], body.off); err != nil {
			return done, err
		}
		done += int(body.n)
	}
	if tail.n > 0 {
		if err := d.readPartial(p[done:], tail.off); err != nil {
			return done, err
		}
		done += int(tail.n)
	}
	return done, eof
}

// readWhole reads the whole sectors at region offset off straight into p, with one
// lower read, and decrypts them in place.
func (d *Device) readWhole(p []byte, off int64) error {
	first, count := lockKeys(off, int64(len(p)))
	d.locks.rlock(first, count)
	err := d.lowerRead(p, off)
	d.locks.runlock(first, count)
	if err != nil {
		return err
	}
	d.c.DecryptSectors(p, p, int(d.l.sectorSize), d.l.iv(off))
	return nil
}

// readPartial reads the part p of the sector holding region offset off.
func (d *Device) readPartial(p []byte, off int64) error {
	s := d.l.sectorStart(off)
	buf := getBuffer(int(d.l.sectorSize))
	defer putBuffer(buf)
	sector := *buf
	key, _ := lockKeys(s, d.l.sectorSize)
	d.locks.rlock(key, 1)
	err := d.lowerRead(sector, s)
	d.locks.runlock(key, 1)
	if err != nil {
		return err
	}
	d.c.DecryptSectors(sector, sector, int(d.l.sectorSize), d.l.iv(s))
	copy(p, sector[off-s:])
	clear(sector)
	return nil
}

// WriteAt encrypts p and writes it at off. A write that does not fit writes nothing.
func (d *Device) WriteAt(p []byte, off int64) (int, error) {
	return d.writeAt(p, off, false)
}

// WriteAtFUA writes p at off and returns when it is on stable storage: every lower write
// it makes goes through the lower device's FUA write (or write and flush).
func (d *Device) WriteAtFUA(p []byte, off int64) (int, error) {
	return d.writeAt(p, off, true)
}

func (d *Device) writeAt(p []byte, off int64, fua bool) (int, error) {
	if err := d.begin(); err != nil {
		return 0, err
	}
	defer d.end()
	if err := d.checkChange(off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.write(p, off, fua)
}

// checkChange validates a change of [off, off+n).
func (d *Device) checkChange(off, n int64) error {
	if d.readOnly {
		return blockdev.ErrReadOnly
	}
	return blockdev.CheckRange(off, n, d.l.size)
}

// maxBatch bounds the ciphertext buffer of one lower write.
const maxBatch = 1 << 20

// write writes p at region offset off, which the caller has checked.
func (d *Device) write(p []byte, off int64, fua bool) (int, error) {
	head, body, tail := d.l.split(off, int64(len(p)))
	done := 0
	if head.n > 0 {
		if err := d.writePartial(p[:head.n], head.off, fua); err != nil {
			return done, err
		}
		done += int(head.n)
	}
	for o := body.off; o < body.end(); {
		n := min(body.end()-o, maxBatch)
		if err := d.writeWhole(p[done:done+int(n)], o, fua); err != nil {
			return done, err
		}
		done += int(n)
		o += n
	}
	if tail.n > 0 {
		if err := d.writePartial(p[done:], tail.off, fua); err != nil {
			return done, err
		}
		done += int(tail.n)
	}
	return done, nil
}

// writeWhole encrypts whole sectors into a pooled buffer (never in the caller's) and
// writes them with one lower write.
func (d *Device) writeWhole(p []byte, off int64, fua bool) error {
	buf := getBuffer(len(p))
	defer putBuffer(buf)
	ct := (*buf)[:len(p)]
	d.c.EncryptSectors(ct, p, int(d.l.sectorSize), d.l.iv(off))
	first, count := lockKeys(off, int64(len(p)))
	d.locks.rlock(first, count)
	err := d.lowerWrite(ct, off, fua)
	d.locks.runlock(first, count)
	return err
}

// writePartial changes the part p of the sector holding region offset off: read,
// decrypt, modify, encrypt, write, all under the sector's lock held exclusively.
func (d *Device) writePartial(p []byte, off int64, fua bool) error {
	s := d.l.sectorStart(off)
	ss := int(d.l.sectorSize)
	buf := getBuffer(ss)
	defer putBuffer(buf)
	sector := *buf
	key, _ := lockKeys(s, d.l.sectorSize)
	d.locks.lock(key)
	defer d.locks.unlock(key)
	if err := d.lowerRead(sector, s); err != nil {
		return err
	}
	d.c.DecryptSectors(sector, sector, ss, d.l.iv(s))
	copy(sector[off-s:], p)
	d.c.EncryptSectors(sector, sector, ss, d.l.iv(s))
	return d.lowerWrite(sector, s, fua)
}

// lowerRead reads len(p) bytes of ciphertext at region offset off.
func (d *Device) lowerRead(p []byte, off int64) error {
	lo := d.l.lowerOffset(off)
	n, err := d.lower.ReadAt(p, lo)
	if n == len(p) {
		return nil // io.ReaderAt may return io.EOF with a full read at the end
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("blockcrypt: read %d bytes at lower offset %d: %w", len(p), lo, err)
}

// lowerWrite writes ciphertext p at region offset off.
func (d *Device) lowerWrite(p []byte, off int64, fua bool) error {
	lo := d.l.lowerOffset(off)
	var err error
	if fua {
		_, err = blockdev.WriteFUA(d.lower, p, lo)
	} else {
		_, err = d.lower.WriteAt(p, lo)
	}
	if err != nil {
		return fmt.Errorf("blockcrypt: write %d bytes at lower offset %d: %w", len(p), lo, err)
	}
	return nil
}

// Trim discards the whole sectors inside [off, off+n) on the lower device, if the
// Config allows discards; the partial sectors at the ends keep their contents (Trim
// allows that). Afterwards the discarded sectors read as noise, not zeroes.
func (d *Device) Trim(off, n int64) error {
	if err := d.begin(); err != nil {
		return err
	}
	defer d.end()
	if !d.allowDiscards {
		return fmt.Errorf("blockcrypt: discards are not allowed on this device: %w", blockdev.ErrNotSupported)
	}
	if err := d.checkChange(off, n); err != nil {
		return err
	}
	first, last := d.l.alignUp(off), d.l.alignDown(off+n)
	if last <= first {
		return nil
	}
	if err := blockdev.Trim(d.lower, d.l.lowerOffset(first), last-first); err != nil {
		return fmt.Errorf("blockcrypt: trim %d bytes at lower offset %d: %w", last-first, d.l.lowerOffset(first), err)
	}
	return nil
}

// WriteZeroes writes encrypted zeroes over [off, off+n). It can never be fast (a hole
// or a zeroed range on the lower device is zero ciphertext, which decrypts to noise),
// so ZeroFast fails with blockdev.ErrNotFast and changes nothing; ZeroMayUnmap is
// ignored for the same reason.
func (d *Device) WriteZeroes(off, n int64, flags blockdev.ZeroFlags) error {
	if err := d.begin(); err != nil {
		return err
	}
	defer d.end()
	if err := d.checkChange(off, n); err != nil {
		return err
	}
	if flags&blockdev.ZeroFast != 0 {
		return blockdev.ErrNotFast
	}
	// Through d.write: d.WriteAt would take begin's read lock a second time.
	return blockdev.WriteZeroBuffers(blockdev.WriterAtFunc(func(p []byte, off int64) (int, error) {
		return d.write(p, off, false)
	}), off, n)
}

// Flush flushes the lower device.
func (d *Device) Flush() error {
	if err := d.begin(); err != nil {
		return err
	}
	defer d.end()
	if err := d.lower.Flush(); err != nil {
		return fmt.Errorf("blockcrypt: flush: %w", err)
	}
	return nil
}

// Close waits for the calls in progress, zeroes the keys and closes the lower device.
// Every later call fails with blockdev.ErrClosed.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return blockdev.ErrClosed
	}
	d.closed = true
	d.c.Close()
	return d.lower.Close()
}

// Buffers for ciphertext and single sectors, in three size classes, aligned for
// O_DIRECT (blockdev.AlignedBuffer) so that a direct File needs no bounce buffer.
var bufferClasses = [...]struct {
	size int
	pool sync.Pool
}{{size: 4096}, {size: 64 << 10}, {size: maxBatch}}

// getBuffer returns a pooled buffer of at least n <= maxBatch bytes, sliced to n.
func getBuffer(n int) *[]byte {
	for i := range bufferClasses {
		c := &bufferClasses[i]
		if n <= c.size {
			b, _ := c.pool.Get().(*[]byte)
			if b == nil {
				nb := blockdev.AlignedBuffer(c.size)
				b = &nb
			}
			*b = (*b)[:n]
			return b
		}
	}
	panic(fmt.Sprintf("BUG: blockcrypt: buffer of %d bytes asked for (at most %d)", n, maxBatch))
}

func putBuffer(b *[]byte) {
	full := (*b)[:cap(*b)]
	for i := range bufferClasses {
		if c := &bufferClasses[i]; len(full) == c.size {
			*b = full
			c.pool.Put(b)
			return
		}
	}
	panic("BUG: blockcrypt: foreign buffer returned to the pool")
}
