// Package nbd serves blockdev.Devices over the Network Block Device protocol and
// connects to NBD servers as a blockdev.Device (the protocol: shared/specs/nbd-protocol.md,
// the NetworkBlockDevice/nbd doc/proto.md; section names are quoted in the code).
//
// Server, Client and the helpers are safe for concurrent use, except that Client.Close
// must not race with the Client's other calls.
//
// # Server
//
// NewServer, AddExport/RemoveExport at any time, Serve once per listener (Listen builds
// them from "unix:PATH" or "tcp:HOST:PORT"; SystemdListeners takes the sockets of
// systemd socket activation), Shutdown to stop gracefully, Notify for sd_notify.
//
// The server speaks the fixed newstyle handshake only (NOTLS mode) with NO_ZEROES, the
// options EXPORT_NAME, GO, INFO (INFO_EXPORT, INFO_BLOCK_SIZE, INFO_NAME,
// INFO_DESCRIPTION), LIST, ABORT and STRUCTURED_REPLY, atrest's extensions
// NBD_OPT_ATREST_CLIENT and NBD_INFO_ATREST_VOLUME (docs/nbd.md), and the commands READ, WRITE,
// FLUSH, TRIM, WRITE_ZEROES, CACHE and DISC with the flags FUA, NO_HOLE, FAST_ZERO and DF.
// Each connection has a reader, which runs small READs and WRITEs itself while the
// device answers them fast (no goroutine wake-up per request; a watchdog hands reading to
// a new goroutine if one of them blocks, so a stuck request never holds up the others),
// and worker goroutines for the rest (one per request in flight, reused while busy);
// replies are written by whichever goroutine finds the connection idle, batched into
// one writev when several are ready. Workers and payload
// bytes are bounded per connection and for the whole server by semaphores, and payload
// buffers come from a pool, so memory is bounded whatever the clients send. Replies go
// out as requests complete, in any order.
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
// refused fast zero ENOTSUP, device failures EIO. A READ larger than the maximum payload
// gets EOVERFLOW with structured replies and EINVAL without; a WRITE larger than the
// maximum gets EINVAL after its payload is skipped, unless it is larger than twice
// max(maximum, 32 MiB), when reading it would be the denial of service that "Size
// constraints" allows a server to disconnect for. A request with a bad magic loses the
// framing and ends the connection.
//
// Limits (ServerConfig): the maximum payload (32 MiB), payload bytes in flight per
// connection (128 MiB) and in all (512 MiB), requests in flight per connection (128) and
// in all (1024), connections (256), options per handshake (64), option length (the
// largest legal NBD_OPT_GO) and the handshake time (30 s). A reader blocked by a limit
// stops reading, so TCP flow control pushes back on the client.
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
// Shutdown order, for `atrest serve` on SIGTERM: Notify("STOPPING=1"), Shutdown(ctx)
// (listeners closed, connections drained, every export flushed), then close the
// devices, which the server never closes. RemoveExport does the same for one export
// (e.g. a drive that is going away) while the others keep serving.
//
// # Client
//
// Dial returns a *Client, a blockdev.Device with every optional capability: pipelined
// requests demultiplexed by cookie, structured replies, several connections with
// CAN_MULTI_CONN, requests split at the server's maximum payload, and reconnection with
// a replay log (see Client). It honours the server's minimum block size, which it asks
// for: with a server that advertises more than 1, an unaligned request fails with
// blockdev.ErrNotSupported instead of being sent (atrest's server, nbdkit and qemu-nbd
// on files advertise 1).
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
// later one: replays precede every retried and new request.
package nbd
