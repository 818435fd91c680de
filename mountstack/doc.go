// Package mountstack sets up, records and tears down the stack under an atrest mount.
//
// The stack is NBD client → fusefs file → loop device (direct I/O) → ext4 on the mount
// point. Mount sets it up in that order and records it in a state file under StateDir
// (named after the mount point); the calling process then serves the FUSE file until
// Stack.Close takes it down in reverse order. Unmount, from any process, unmounts the
// file system, has the serving process stop (SIGTERM, so that process must answer it
// with Close) and removes whatever a crash left behind, guided by the state file.
//
// A stack whose NBD server is gone cannot be taken down in order: every request would
// wait for the server (Options.IOTimeout). Unmount checks that the server answers
// first, and if it does not, it aborts the FUSE connection, so that everything stacked
// on it fails at once, detaches the file system and the loop device lazily, and has the
// serving process give the stack up without flushing (SIGUSR1, so that process must
// answer it with Stack.Abandon and exit), which records in the state file what its NBD
// client held unflushed, lost with it; Unmount reports it (Unmounted).
//
// The package prints nothing: it logs through Options.Logger, and its
// errors match the sentinels in errors.go where a caller has to tell cases apart. It
// needs root (see volmount and fusefs). The process that calls Mount should already be
// an I/O flusher (fusefs.EnsureIOFlusher), which re-executes the process and so is the
// caller's to do.
//
// Concurrency: Mount, Unmount and the state file functions keep nothing in memory and
// may run concurrently for different mount points; for one mount point, Mount and
// Unmount must not overlap (they normally run in different processes, one after the
// other). A Stack's methods are safe for concurrent use, except Close, which must be
// called once. Nothing here may be called from a goroutine that serves a FUSE request.
package mountstack
