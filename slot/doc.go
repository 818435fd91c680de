// Package slot is the place of one drive in a volume: a [Slot] is a blockdev.Device
// that holds the drive currently in it, or none, and outlives the drive. A drive pulled
// out of the slot (by the operator with [Slot.Pull], or found gone after a failed I/O)
// makes requests wait until it is put back ([Slot.Reinsert], at whatever path it comes
// back), so that the layers above see a stall, not an error.
//
// # Where it sits
//
// The stack of a served drive is blockcrypt → Slot → blockdev.File: the slot is below
// the encryption, at the raw drive. So it sees, keeps and logs ciphertext only, and it
// can read the drive's LUKS2 header, which the data segment above does not show: a
// drive put back must carry the same [Identity] (the header's UUID and the digest of
// its data key), so blockcrypt goes on with the key it has, and a drive that was
// reformatted, or another drive with the same UUID, is refused with [ErrNotSameDrive]
// before a byte is written to it. A mirror (which comes next) puts one Slot under each
// member, so that each member waits or fails on its own.
//
// # A failed request and the probe
//
// A request that fails with an error of the class blockdev.ErrGone, ErrMedium or
// ErrTimeout makes the slot probe the drive at once; concurrent failures share one
// probe. The probe checks, within [Config.ProbeTimeout], that the path still leads to
// the drive the slot opened (a block device: the same device number, still listed in
// /sys/dev/block; a regular file: the same inode) and that the first 4 KiB, read
// afresh (with O_DIRECT from a block device, so that no cache answers for the drive),
// hold a LUKS2 binary header with the drive's UUID. A probe that does not answer in
// time fails: a drive that stopped answering is as gone as one that went.
//
// When the probe fails, the drive is gone: the slot marks it [Missing], closes it (on a
// goroutine: a close may wait for a call stuck in the drive), and the failed request
// waits like every other. When the probe succeeds, the error was a medium error on that
// range: the request returns it, of the class ErrMedium (a mirror reads the range from
// another member), and the drive stays. Other errors (ErrOutOfRange, ErrNotSupported,
// ErrReadOnly, ErrNotFast) say nothing about the drive and are returned as they are.
// [Slot.Check] probes on demand: discovery calls it when a drive's name vanishes, which
// finds a drive that hangs without failing anything.
//
// # Waiting
//
// While the drive is missing, every request waits for it, at most
// [Config.MissingTimeout] after the drive went: then it fails with an error of the
// classes ErrMissing and blockdev.ErrTimeout saying since when the drive is missing
// (the NBD server answers EIO to this request and keeps the connection), and so does every later request, at once ([State].TimedOut), until the
// drive is put back. Close fails the waiting requests with blockdev.ErrClosed.
//
// # Generations
//
// Every drive put into the slot is a new generation. A request remembers the drive it
// ran on, and a result of a drive that is no longer in the slot is never returned:
// a request that fails on it, or even returns from it (a drive replaced while the
// request was stuck in the kernel), is done again on the drive now in the slot, or
// waits for one. A write that failed while the drive was being pulled is answered only
// once it is on the drive that came back.
//
// # The replay log
//
// A drive that is pulled loses what it had not made durable: a disk its volatile
// cache, a loop device the page cache of its file. The writes were answered, and a file
// system above counts on them until its next flush. So the slot keeps a copy of every
// change answered since the last flush, in order, in memory: each write's data (copied
// once, into pooled chunks of 4 KiB to 1 MiB), and the ranges of zeroings and trims. A
// flush that succeeds drops what was logged before it started. [Slot.Reinsert] replays
// the whole log in order on the drive that came back, then flushes it, before any
// request runs; a trim that the returned drive refuses is skipped (a trimmed range has
// no defined contents anyway). A FUA write is durable when answered and needs no entry,
// unless it overlaps logged changes that a replay would otherwise write over it.
//
// The log costs one copy of each write on the hot path, and memory: when it holds more
// than [Config.LogLimit] (64 MiB by default), the write that crossed the limit flushes
// the drive before it returns (one such flush at a time; the other writes go on
// meanwhile, and wait for it only if the log reaches twice the limit). The limit is
// thus also what one pull can cost in memory (at most twice the limit, plus a little
// per entry). A negative limit disables the log: every change is then flushed before it
// is answered, which is slow.
//
// The log lives in the daemon's memory and dies with it: if the daemon crashes (or is
// killed) while a drive is out, the writes that drive had not made durable are lost, as
// they are when a drive with a volatile cache loses power. A file system copes with
// that as with a power cut: what it flushed is there. Across a reconnection of the NBD
// client (a restart of the daemon), the client's own replay log resends the writes of
// `atrest mount` that were not yet flushed.
//
// Concurrent overlapping writes land in some order, as on any disk, but the log may
// hold them in another order than the drive did; only a client that writes the same
// range twice without waiting for the first answer can tell.
//
// # Concurrency
//
// A Slot is safe for concurrent use. The hot path of a present drive is the call and
// an atomic load of the drive in the slot before and after it, and for a change the
// append to the log under a mutex (the copy is made outside it). No goroutine is
// started per request.
package slot
