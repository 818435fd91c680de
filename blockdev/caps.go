package blockdev

// Caps are what a Device can do, as it says when asked. A layer that decides once (an
// NBD handshake, a mount) asks at that moment; one that decides per request asks each
// time. Caps may change while a device is open: a File learns that its file system
// cannot punch holes, an NBD client reconnects to a server that offers other flags.
// Calls stay correct either way: a capability that went away fails with
// ErrNotSupported (or ErrNotFast, ErrReadOnly), never silently.
//
// A wrapping layer answers for itself, usually by asking the layer below and adding its
// own limits (as nbdkit's filters answer can_trim, can_zero and can_fua): blockcrypt
// says Trim only when its header allows discards and the drive below can trim.
type Caps struct {
	// ReadOnly: every change (WriteAt, WriteAtFUA, Trim, WriteZeroes) fails with
	// ErrReadOnly. A read-only device reports none of the capabilities below but
	// BlockSize.
	ReadOnly bool
	// Trim: the device has Trim and it reaches storage (it does not fail with
	// ErrNotSupported, unless the capability went away since it was asked).
	Trim bool
	// Zeroes: the device zeroes ranges itself (WriteZeroes), so a caller need not send
	// it buffers of zeroes; blockdev.WriteZeroes works on every device regardless.
	Zeroes bool
	// FastZero: WriteZeroes with ZeroFast can succeed. Without it, ZeroFast always
	// fails with ErrNotFast and changes nothing.
	FastZero bool
	// FUA: the device makes a single write durable in one call (WriteAtFUA), without
	// the caller's Flush of everything; it may still flush underneath, as nbdkit's
	// emulated FUA does.
	FUA bool
	// BlockSize is the preferred I/O granularity (PreferredBlockSize).
	BlockSize int
}

// CapsReporter is a Device that says what it can do. Every Device of atrest implements
// it; CapsOf answers for others.
type CapsReporter interface {
	Caps() Caps
}

// CapsOf returns dev's capabilities: its own answer if it is a CapsReporter, otherwise
// what its optional interfaces promise (Trimmer, ZeroWriter, FUAWriter, BlockSizer),
// and never ReadOnly, which a foreign device cannot say.
func CapsOf(dev Device) Caps {
	if r, ok := dev.(CapsReporter); ok {
		return r.Caps()
	}
	_, trim := dev.(Trimmer)
	_, zero := dev.(ZeroWriter)
	_, fua := dev.(FUAWriter)
	return Caps{Trim: trim, Zeroes: zero, FastZero: zero, FUA: fua, BlockSize: PreferredBlockSize(dev)}
}
