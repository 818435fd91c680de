// Package discovery finds the drives of this machine by what their LUKS2 headers say,
// wherever they appear, and tells when that changes. It reads and reports; it never
// writes to a drive and never decides what a drive is to the node (registered,
// foreign, stale: the node decides from the header fields reported here).
//
// # What is scanned
//
// A Scanner looks at three kinds of Sources:
//   - Patterns: shell globs (path/filepath.Match syntax, absolute), such as
//     `/dev/disk/by-id/*`. DefaultPatterns gives the default: the by-id links where
//     udev makes them, otherwise FallbackPatterns.
//   - Paths: explicit paths, normally the paths at which the node last saw its drives.
//   - Dirs: directories whose entries are all looked at, normally the directories of
//     registered image files, so that an image file moved or copied into one is found.
//
// Only block devices and regular files are ever opened. A glob matches whatever is in
// a directory (`/dev/loop*` matches the character device /dev/loop-control), and
// opening a character device can have effects of its own (a tape rewinds, a watchdog
// starts), a FIFO or a socket can block: every name is stat'ed first, then opened as
// O_PATH|O_NOFOLLOW at its resolved path, fstat'ed, and only then opened for reading
// through /proc/self/fd — the same inode, so a name swapped for a FIFO between the
// stat and the open is never opened. The descriptor for reading is fstat'ed once more.
//
// Machines without udev (containers, minimal installs) have no /dev/disk/by-id. There
// the kernel's own names are what there is: FallbackPatterns (`/dev/sd*`, `/dev/vd*`,
// `/dev/xvd*`, `/dev/nvme*n*`, `/dev/mmcblk*`, `/dev/loop*`). They include partitions,
// which is right (a LUKS2 header may sit on one); scanning them costs one open and a
// few reads of 4 KiB per device. Add `/dev/md*` or `/dev/mapper/*` where drives are
// built from those.
//
// # One drive, one candidate
//
// A device reached under several names is one Candidate with all of its names. Names
// are collapsed by identity, the Key: a block device by its device number (st_rdev), a
// regular file by (st_dev, st_ino), and a loop device over a regular file by its
// backing file's (st_dev, st_ino) (LOOP_GET_STATUS64, which the kernel answers with a
// stat of the backing file), so that an image file and the loop devices attached over
// it are one candidate; a loop device over a block device collapses with that device.
// A by-id link collapses with the node it points to. A loop device whose probe has
// never answered is keyed by its own device number until it does; one that answered
// before keeps its backing file's key while it does not.
//
// A loop device over a file of an atrest FUSE mount (type fuse.atrest: the plaintext
// of a volume that `atrest mount` serves) is never a candidate, and is not read: it is
// no drive, and reading it would go through this node's own export.
//
// Each Candidate names the path to open, Path: the first of Paths, which are ordered
// by preference: a path given in Sources.Paths, then a link under /dev/disk/by-id,
// then any other link, then a device node, then an image file; ties in path order.
// Given paths come first because the node chose them; by-id links survive a move to
// another port or controller and a reboot, which a kernel name (/dev/sdc) does not; a
// loop device is preferred to the file under it so that the node reads what every
// other user of the loop device reads.
//
// # What is reported
//
// For each candidate: its names, Kind, size, the LUKS2 header UUID and label, and the
// atrest token (cluster, volume name and UUID, member index and count, master key id),
// or in Err why there is none, as a class the node can act on: ErrNotLUKS,
// ErrUnsupported, ErrDamaged, ErrNoToken, ErrBadToken, ErrIO, ErrNotAnswering. A
// header with one damaged or stale copy is reported with its token and a
// HeaderWarning; it is never repaired here. Two candidates (two distinct devices)
// whose headers have the same UUID are both marked Duplicate: the node must use
// neither.
//
// Headers are read with O_DIRECT from block devices, so that a loop device's page
// cache cannot show a header that was since rewritten through its backing file, and
// through the page cache from regular files, which is coherent.
//
// # Hostile and broken devices
//
// Every probe (open, size, loop status, header read) runs in its own goroutine and is
// given Options.ProbeTimeout: a device that does not answer (a dying disk, a hung
// FUSE file under a loop device) is reported with ErrNotAnswering and does not stall
// the scan. A probe stuck in the kernel cannot be cancelled; while it is stuck, later
// scans report the device as not answering without starting another probe, so at most
// one goroutine per device is ever stuck; when it returns, Watcher rescans. (A thread
// stuck in the kernel also holds up the process's exit until the device answers or
// fails, as it would for any other reader.) Probes run
// at most Options.Parallel at a time, and a scan looks at no more than
// Options.MaxNames names (directory entries included), reading directories in chunks:
// a huge directory or a glob over thousands of files costs bounded memory and time,
// and what was left out is reported in Snapshot.Problems.
//
// # Watching
//
// Scanner.Watch rescans when something may have changed and sends the changes
// (appeared, changed, vanished: by Key) on a channel, within a second of a hot-plug:
//   - kernel uevents of the block subsystem (a NETLINK_KOBJECT_UEVENT socket). A
//     uevent only triggers a rescan, so a forged or lost one cannot mislead: the scan
//     is the truth. Attaching or detaching a loop device sends only
//     change@/devices/virtual/block/loopN, since /dev/loopN already exists, so
//     inotify on /dev would see nothing. Where the socket is refused (EPERM in some
//     sandboxes) the Watcher logs a warning and goes on with the rest;
//   - inotify on the Dirs and on the directories of Patterns and Paths outside /dev
//     (created, moved in or out, deleted, closed after writing), so that an image
//     file copied or moved into place is seen at once;
//   - a periodic rescan (WatchOptions.Rescan, 30 s by default), the last fallback,
//     which also watches again a directory that did not exist before.
//
// Triggers are debounced (WatchOptions.Debounce after the first one; those that arrive
// during a scan cause one more).
//
// # Concurrency
//
// A Scanner's methods are safe for concurrent use; SetSources takes effect at the next
// scan. A Watcher runs one scan at a time in its own goroutine and blocks until its
// Update is received, then diffs the next scan against the last Update received, so a
// slow receiver misses no change. Close stops the watcher's goroutines and waits for
// them; only probes stuck in the kernel (above) outlive it.
package discovery
