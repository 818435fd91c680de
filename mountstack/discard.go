package mountstack

import (
	"errors"
	"fmt"
	"github.com/atrest/atrest/fusefs"
	"github.com/atrest/atrest/volmount"
	"log/slog"
)

// prepareDiscards sets the loop device up, before anything uses it, so that fstrim on
// the volume either reaches the drive as trims or is refused from the first call.
//
// A loop device sends both a discard and a WRITE_ZEROES that may unmap to its file as
// fallocate PUNCH_HOLE, and a punched hole must read back as zeroes, which a trimmed
// range of an encrypted drive does not (it decrypts to noise). So a punched hole may be
// passed on as a trim only while the loop device has write-zeroes off: then the block
// layer zeroes by writing zero pages, and every punched hole is a discard. Linux 6.18's
// loop driver turns write-zeroes off for good (and keeps discards) when its file
// answers ZERO_RANGE with EOPNOTSUPP: RefuseZeroRange makes the FUSE file do that for a
// BLKZEROOUT of the first block, without changing a byte; the queue limit says whether
// it worked (if not, punched holes stay zeroings, which the encrypted drive refuses, and
// fstrim is refused).
//
// Without discards, a BLKDISCARD that the FUSE file refuses turns the loop device's
// discards off at once, so that the first fstrim is already refused ("the discard
// operation is not supported"), instead of failing inside ext4, which would report
// the range trimmed.
func prepareDiscards(srv *fusefs.Server, name, loop string, discard bool, log *slog.Logger) {
	if !discard {
		err := volmount.Discard(loop, 0, 4096)
		if n, lerr := volmount.QueueLimit(loop, "discard_max_bytes"); lerr != nil || n != 0 {
			log.Warn(fmt.Sprintf("discards are not allowed on this drive, but %s still accepts them: the first fstrim may report bytes it did not trim", loop), "err", errors.Join(err, lerr))
		}
		return
	}
	err := srv.RefuseZeroRange(name, 0, 4096, func() error { return volmount.ZeroOut(loop, 0, 4096) })
	if n, lerr := volmount.QueueLimit(loop, "write_zeroes_max_bytes"); err != nil || lerr != nil || n != 0 {
		log.Warn(fmt.Sprintf("could not turn write-zeroes off on %s: its zeroings cannot be told from discards, so fstrim will be refused", loop), "err", errors.Join(err, lerr), "write_zeroes_max_bytes", n)
	}
}

// writeZeroesOff reports whether every loop device over file has write-zeroes off, so
// that the punched holes it sends are discards (see prepareDiscards). It only reads
// sysfs: safe from a goroutine that serves FUSE.
func writeZeroesOff(file string) bool {
	loops, err := volmount.LoopsOf(file)
	if err != nil || len(loops) == 0 {
		return false
	}
	for _, l := range loops {
		if n, err := volmount.QueueLimit(l, "write_zeroes_max_bytes"); err != nil || n != 0 {
			return false
		}
	}
	return true
}
