// Package blockdev defines Device, the interface that every storage layer of atrest
// implements and wraps (drive → blockcrypt → NBD server; NBD client → FUSE), its optional
// one-method capabilities, and the plain implementations: File (a regular file or a
// block device), Mem (memory, for tests) and Faulty (fault injection, for tests), and
// Bound, a layer that bounds the time of each call.
//
// Every Device in the project is safe for concurrent use by several goroutines: reads
// and writes of disjoint ranges may run in parallel, and Flush may run beside them.
// Overlapping concurrent writes land in some order, as on a disk.
//
// # Capabilities
//
// The optional methods (Trimmer, ZeroWriter, FUAWriter, BlockSizer) say what a type
// can be asked; [Caps] say what the device can do now, and every Device of atrest
// reports them ([CapsReporter]; [CapsOf] for others). A wrapping layer answers for
// itself by asking the layer below, so a decision is made once, where its reason is:
// blockcrypt passes trims only when the LUKS2 header allows discards (discards are off
// by default: they tell the drive which sectors are unused) and the drive can trim; the
// NBD server advertises NBD_FLAG_SEND_TRIM from its export's Caps, the NBD client's
// Caps come from the server's flags, and the FUSE file lets punched holes through when
// its Device's Caps say Trim. No layer is told by hand.
//
// # Error classes
//
// An error that a layer above can act on wraps one of the classes, matched with
// errors.Is: [ErrGone] (the device is not there: drop it), [ErrMedium] (this request
// failed: another copy may have the data), [ErrTimeout] (no answer in time, see
// Bound), [ErrOutOfRange], [ErrNotSupported], [ErrReadOnly] and [ErrClosed] (the
// caller's mistake or the device's limits: retrying elsewhere does not help). File
// gives a kernel errno its class ([Classify]) and keeps the errno, so both match.
// Every layer passes the class of the error below it on unchanged, across the NBD wire
// too (the server answers ErrGone with NBD_ESHUTDOWN, ErrMedium with NBD_EIO; the
// client maps them back), and the FUSE file answers the kernel with the errno the
// block layer uses for the class (ENODEV, EIO, ETIMEDOUT).
//
// # Bounding time
//
// Device takes no context.Context, and that is deliberate: ReadAt and WriteAt are
// io.ReaderAt and io.WriterAt, called on the hot path by every layer, and most layers
// need no time bound (a single-drive volume waits for its drive, as the kernel does).
// A context could not stop a call blocked in the kernel anyway (a pread on a drive that
// stopped answering); only leaving it behind can. So the layers that need a bound (a
// mirror's members, a probe of a drive) wrap the device below them in [Bound]: a
// watchdog that fails a call with ErrTimeout after its limit and leaves the lower call
// running in the background, its result dropped. It reads into and writes from private
// buffers, so the caller's buffer is never touched after the call returned; a change
// that timed out may still land later, so the caller treats that range as unknown (a
// mirror marks the member failed and the region dirty). The price is a goroutine and a
// buffer copy per call, paid only where a bound is asked for.
package blockdev
