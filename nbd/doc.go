// Package nbd serves blockdev.Devices over the Network Block Device protocol and
// connects to NBD servers as a blockdev.Device. The protocol is
// https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md; the code quotes
// its section names.
//
// Server, Client and the helpers are safe for concurrent use, except that Client.Close
// must not race with the Client's other calls.
//
// # Server
//
// NewServer, AddExport/RemoveExport at any time, Serve once per listener (Listen builds
// them from "unix:PATH" or "tcp:HOST:PORT"; the sockets of systemd socket activation
// serve as well), Shutdown to stop gracefully.
//
// The server speaks the fixed newstyle handshake only (NOTLS mode) with NO_ZEROES, the
// options EXPORT_NAME, GO, INFO (INFO_EXPORT, INFO_BLOCK_SIZE, INFO_NAME,
// INFO_DESCRIPTION), LIST, ABORT and STRUCTURED_REPLY, atrest's extensions
// NBD_OPT_ATREST_CLIENT and NBD_INFO_ATREST_VOLUME (docs/nbd.md), and the commands READ, WRITE,
// FLUSH, TRIM, WRITE_ZEROES, CACHE and DISC with the flags FUA, NO_HOLE, FAST_ZERO and DF.
// What an export advertises comes from its Device's blockdev.Caps, asked at each
// handshake: SEND_TRIM where the Device trims (blockcrypt: where the drive's header
// allows discards), READ_ONLY where the Device or the Export is read-only; FUA,
// WRITE_ZEROES and FAST_ZERO on every writable export (a Device without them gets a write
// and a flush, written zeroes, or a fast refusal).
// Each connection has a reader, which runs small READs and WRITEs itself while the
// device answers them fast (no goroutine wake-up per request; a watchdog hands reading to
// a new goroutine if one of them blocks, so a stuck request never holds up the others),
// and worker goroutines for the rest (one per request in flight, reused while busy);
// replies are written by whichever goroutine finds the connection idle, batched into
// one writev when several are ready. Workers and payload
// bytes are bounded per connection and for the whole server (each connection has a
// reserve of its own and borrows beyond it from a pool all share), and payload buffers
// come from a pool, so memory is bounded whatever the clients send. Replies go out as
// requests complete, in any order.
//
// Durability is the Device's: a FLUSH is answered after Device.Flush returns, which
// covers every write that returned before it was called, and a write is answered only
// after Device.WriteAt returned. So a FLUSH covers every write answered before it on
// any connection to the same export, which is what NBD_FLAG_CAN_MULTI_CONN promises; the
// server has no cache of its own. A FUA write goes through blockdev.WriteFUA.
//
// Error replies follow "Error values": out-of-range reads and trims EINVAL, out-of-range
// writes and write-zeroes ENOSPC (the payload is read and dropped, the connection
// stays), changes to a read-only export EPERM, unknown commands and flags EINVAL, a
// refused fast zero ENOTSUP; device errors by their class: a device gone
// (blockdev.ErrGone) or closed ESHUTDOWN, which makes clients reconnect and so find the
// device again if it comes back, and medium errors, timeouts and anything else EIO. A READ larger than the maximum payload
// gets EOVERFLOW with structured replies and EINVAL without; a WRITE larger than the
// maximum gets EINVAL after its payload is skipped, unless it is larger than twice
// max(maximum, 32 MiB), when reading it would be the denial of service that "Size
// constraints" allows a server to disconnect for. A request with a bad magic loses the
// framing and ends the connection.
//
// Limits (ServerConfig): the maximum payload (32 MiB); payload bytes and requests in
// flight per connection (128 MiB, 128), of which a reserve of its own (1 MiB, 16
// requests) and the rest borrowed from a pool that all connections share (512 MiB,
// 1024), so in all at most 768 MiB and 5120 requests; connections in transmission (256)
// and in their handshake (64, and 8 per TCP address), options per handshake (64), option
// length (the largest legal NBD_OPT_GO), the time to the first option (10 s) and for the
// whole handshake (30 s), and the write timeout (30 s). A reader blocked by a limit
// stops reading, so TCP flow control pushes back on the client.
//
// No client can starve the others: one that sends requests and never reads the replies
// holds what it borrowed from the pool, but not the reserves of the other connections,
// which get their requests of up to 1 MiB through whatever it does (larger ones wait
// for the pool), and it is dropped once it has taken no reply for the write timeout,
// which frees what it held. A connection beyond the handshake limits closes the
// handshake whose client has been silent the longest (of the same address, for the
// per-address one), so idle connections cannot lock out a client that completes its
// handshake. The design and its reasons are in sema.go and serverConn.writeOut.
//
// # One writer per volume
//
// The server lets one writer at a time write to a volume: the exports with the same
// Export.VolumeID (without one, the same Device) are one volume, whatever their names,
// listeners and connections. A connection's writer is the writer id that atrest's
// client presents (NBD_OPT_ATREST_CLIENT: one per Client, on all its connections and
// reconnects), else the peer process on a unix socket (SO_PEERCRED's pid and the
// process start time: all connections of one nbdcopy or qemu are one writer), else the
// TCP peer's IP address. The first connection with write access makes its writer the
// holder, until the holder's last connection to the volume has ended (TCP keepalive
// and TCP_USER_TIMEOUT end a vanished peer's within about a minute). Another writer's
// connection is refused with NBD_REP_ERR_POLICY if it presented an identity, and gets
// NBD_FLAG_READ_ONLY otherwise; a connection with read-only intent never holds the
// volume. A take-over (ClientOptions.TakeOver) ends the holder's connections gracefully
// and lets the new writer in once they have ended; the writer taken over may not write
// to the volume again. Export.SharedWriters turns the rule off. docs/nbd.md has the
// details and the wire format.
//
// Shutdown order, for `atrest serve` on SIGTERM: STOPPING=1 to systemd, Shutdown(ctx)
// (listeners closed, connections drained, every export flushed), then close the
// devices, which the server never closes. RemoveExport does the same for one export
// (e.g. a drive that is going away) while the others keep serving.
//
// # Client
//
// Dial returns a *Client, a blockdev.Device with every optional capability: pipelined
// requests demultiplexed by cookie, structured replies, several connections with
// CAN_MULTI_CONN, requests split at the server's maximum payload, and reconnection with
// a replay log (see Client). Its Caps are the server's transmission flags, and its
// errors keep their blockdev class across the wire (see RemoteError and
// ErrDisconnected). It honours the server's minimum block size, which it asks
// for: with a server that advertises more than 1, an unaligned request fails with
// blockdev.ErrNotSupported instead of being sent (atrest's server, nbdkit and qemu-nbd
// on files advertise 1). Probe checks, without entering transmission, that a server
// answers and offers an export.
//
// Volume identity: Dial pins the VolumeID that atrest's server advertises
// (NBD_INFO_ATREST_VOLUME, which the client asks for). Every reconnect must find the
// same one (none again, where there was none) before it replays or sends anything;
// otherwise the export name now serves another volume, and the client fails every
// request for good with ErrVolumeChanged, having sent nothing there. A reconnect that
// another writer's hold refuses (ErrVolumeBusy) is tried again until ReconnectTimeout;
// one refused because this client was taken over (ErrTakenOver) fails for good.
//
// Durability across reconnects: the kernel's nbd client resends requests after a
// reconnect and reports a later flush as a success, even when the server crashed and lost
// writes it had answered. This client keeps those writes (the replay log, 64 MiB by
// default, emptied by every successful Flush and by a Flush of its own when full) and
// sends them again, in order, on the new connection before anything else, so a Flush
// that succeeds after a reconnect covers them. Without the log a Flush reports
// ErrWritesLost once instead. A write is never acknowledged twice nor reordered against a
// later one: replays precede every retried and new request. Client.Unflushed tells
// what the log holds: what a client abandoned now would lose.
//
// A request waits for a reconnect at most ClientOptions.ReconnectTimeout; once one has
// waited that long in vain, the client fails requests at once, while it goes on trying
// to reconnect, until it is back (see Client).
package nbd
