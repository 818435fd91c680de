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
// INFO_DESCRIPTION), LIST, ABORT and STRUCTURED_REPLY, and the commands READ, WRITE,
// FLUSH, TRIM, WRITE_ZEROES, CACHE and DISC with the flags FUA, NO_HOLE, FAST_ZERO and DF.
// Each connection has a reader goroutine, one worker goroutine per request in flight
// and a writer goroutine; workers and payload bytes are bounded per connection and for
// the whole server by semaphores, and payload buffers come from a pool, so memory is
// bounded whatever the clients send. Replies go out as requests complete, in any order.
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
// # Client
//
// Dial returns a *Client, a blockdev.Device with every optional capability: pipelined
// requests demultiplexed by cookie, structured replies, several connections with
// CAN_MULTI_CONN, requests split at the server's maximum payload, and reconnection with
// a replay log (see Client).
package nbd
