package slot

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
)

// node is what was at a drive's path when the slot took the drive: the device number
// of a block device, the inode of a regular file; unknown when the path did not stat
// then (a drive the caller opened elsewhere).
type node struct {
	known, block bool
	rdev         uint64 // block devices
	dev, ino     uint64 // regular files
}

// statNode stats path for the node of a drive opened there.
func statNode(path string) node {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return node{}
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		return node{known: true, block: true, rdev: st.Rdev}
	case unix.S_IFREG:
		return node{known: true, dev: st.Dev, ino: st.Ino}
	}
	return node{}
}

// probe asks whether the drive h is still there, within the probe timeout: nil if it
// is, otherwise why not. The probe runs on a goroutine of its own, left behind if it
// does not answer in time (a drive that stopped answering holds its read until it goes
// for good); a probe that does not answer counts as failed.
func (s *Slot) probe(h *held) error {
	done := make(chan error, 1)
	go func() { done <- probeDrive(h.path, h.node, s.id.UUID) }()
	t := time.NewTimer(s.probeTimeout)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return fmt.Errorf("the probe of %s did not answer within %v", h.path, s.probeTimeout)
	}
}

// probeDrive checks that drive uuid is still at path, as it was when it was opened
// (was): a block device with the same device number that the kernel still lists in
// /sys/dev/block, or the same regular file; and that the first 4 KiB read afresh (with
// O_DIRECT from a block device, so the answer comes from the drive and not from a
// cache) hold a LUKS2 binary header with the drive's UUID.
func probeDrive(path string, was node, uuid string) error {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	kind := st.Mode & unix.S_IFMT
	switch {
	case was.block:
		if kind != unix.S_IFBLK || st.Rdev != was.rdev {
			return fmt.Errorf("%s is no longer block device %d:%d", path, unix.Major(was.rdev), unix.Minor(was.rdev))
		}
		sys := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		if _, err := os.Stat(sys); err != nil {
			return fmt.Errorf("the kernel no longer lists %s: %w", path, err)
		}
	case was.known:
		if kind != unix.S_IFREG || st.Dev != was.dev || st.Ino != was.ino {
			return fmt.Errorf("%s is no longer the file the drive was opened from", path)
		}
	case kind != unix.S_IFBLK && kind != unix.S_IFREG:
		return fmt.Errorf("%s is neither a block device nor a regular file", path)
	}
	dev, err := blockdev.OpenFile(path, blockdev.FileOptions{ReadOnly: true, Direct: kind == unix.S_IFBLK})
	if err != nil {
		return err
	}
	defer dev.Close()
	got, err := luks2.ReadUUID(dev)
	if err != nil {
		return fmt.Errorf("read the LUKS2 header of %s: %w", path, err)
	}
	if got != uuid {
		return fmt.Errorf("%s holds drive %s now", path, got)
	}
	return nil
}
