package drive

import (
	"encoding/binary"
	"errors"
	"io"
	"os/exec"
	"strings"
)

// Signatures lists what the drive at path (open as dev) holds that formatting would
// destroy: atrest reads the signatures it knows itself, and asks `blkid -p` (low-level
// probing, no cache) for the others when it is installed.
func Signatures(dev io.ReaderAt, path string) ([]string, error) {
	head := make([]byte, 128<<10)
	n, err := dev.ReadAt(head, 0)
	if err != nil && err != io.EOF {
		return nil, err
	}
	head = head[:n]
	at := func(off int, sig string) bool {
		return len(head) >= off+len(sig) && string(head[off:off+len(sig)]) == sig
	}
	var found []string
	add := func(s string) {
		for _, x := range found {
			if x == s {
				return
			}
		}
		found = append(found, s)
	}
	if at(0, "LUKS\xba\xbe") {
		add("a LUKS header")
	}
	for _, off := range []int{16384, 32768, 65536} {
		if at(off, "SKUL\xba\xbe") {
			add("a LUKS2 secondary header")
		}
	}
	if len(head) > 1081 && binary.LittleEndian.Uint16(head[1080:]) == 0xEF53 {
		add("an ext2/3/4 file system")
	}
	if at(0, "XFSB") {
		add("an XFS file system")
	}
	if at(65600, "_BHRfS_M") {
		add("a btrfs file system")
	}
	if at(512, "EFI PART") || at(4096, "EFI PART") {
		add("a GPT partition table")
	}
	if len(head) >= 512 && head[510] == 0x55 && head[511] == 0xAA {
		add("an MBR partition table or boot sector")
	}
	if at(4086, "SWAPSPACE2") || at(4086, "SWAP-SPACE") {
		add("swap space")
	}
	if at(512, "LABELONE") {
		add("an LVM physical volume")
	}
	if blkid, err := exec.LookPath("blkid"); err == nil {
		out, err := exec.Command(blkid, "-p", "-o", "export", path).Output()
		var ee *exec.ExitError
		switch {
		case err == nil:
			for _, line := range strings.Split(string(out), "\n") {
				if v, ok := strings.CutPrefix(line, "TYPE="); ok {
					add("a " + v + " signature (blkid)")
				}
				if v, ok := strings.CutPrefix(line, "PTTYPE="); ok {
					add("a " + v + " partition table (blkid)")
				}
			}
		case errors.As(err, &ee) && ee.ExitCode() == 2:
			// Nothing found.
		default:
			// blkid -p exits 8 on ambivalent results; that is something too.
			if errors.As(err, &ee) && ee.ExitCode() == 8 {
				add("several signatures (blkid)")
			}
		}
	}
	return found, nil
}
