package volmount

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
)

// Signature is what blkid found on a device.
type Signature struct {
	// Type is the file system, partition table or other format ("ext4", "swap",
	// "crypto_LUKS", "dos", "gpt", ...); "" when blkid found nothing.
	Type string
	// Usage is blkid's class: "filesystem", "crypto", "raid", "other", or
	// "partition table".
	Usage string
	// Label and UUID, when the format has them.
	Label, UUID string
}

// Empty reports whether nothing was found.
func (s Signature) Empty() bool { return s.Type == "" }

// String names what was found, for messages.
func (s Signature) String() string {
	if s.Empty() {
		return "nothing"
	}
	out := s.Type
	if s.Usage != "" {
		out += " " + s.Usage
	}
	if s.Label != "" {
		out += fmt.Sprintf(" labelled %q", s.Label)
	}
	if s.UUID != "" {
		out += " UUID " + s.UUID
	}
	return out
}

// ErrNotEmpty is returned when a device that was to be formatted holds a signature.
var ErrNotEmpty = errors.New("the device is not empty")

// ErrUnsupportedFS is returned when a file system other than ext4 was to be created.
var ErrUnsupportedFS = errors.New("only ext4 is created")

// Probe looks for any signature on dev with blkid's low-level probing (superblocks
// and partition tables, no cache): file systems, LUKS headers, RAID members, swap,
// partition tables. An ambivalent result (several signatures) is an error that names
// them. A device without a signature may still hold data: blkid cannot tell noise
// from ciphertext, and a fresh encrypted volume reads as noise.
func Probe(dev string) (Signature, error) {
	// blkid says "nothing found" for a path that does not exist.
	if _, err := os.Stat(dev); err != nil {
		return Signature{}, fmt.Errorf("probe: %w", err)
	}
	blkid, err := exec.LookPath("blkid")
	if err != nil {
		return Signature{}, fmt.Errorf("probe %s: blkid (util-linux) is not installed: %w", dev, err)
	}
	cmd := exec.Command(blkid, "-p", "-o", "export", dev)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Env = []string{"LC_ALL=C"}
	err = cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit) && exit.ExitCode() == 2:
		return Signature{}, nil // nothing found
	case errors.As(err, &exit) && exit.ExitCode() == 8:
		return Signature{}, fmt.Errorf("probe %s: several signatures found (ambivalent): %s: %w",
			dev, strings.TrimSpace(stderr.String()+" "+stdout.String()), ErrNotEmpty)
	default:
		return Signature{}, fmt.Errorf("probe %s: blkid: %w: %s", dev, err, strings.TrimSpace(stderr.String()))
	}
	var s Signature
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), "=")
		switch k {
		case "TYPE":
			s.Type = v
		case "USAGE":
			s.Usage = v
		case "LABEL":
			s.Label = v
		case "UUID":
			s.UUID = v
		case "PTTYPE":
			if s.Type == "" {
				s.Type, s.Usage = v, "partition table"
			}
		}
	}
	if s.Empty() {
		return s, fmt.Errorf("probe %s: blkid reported a signature without a type: %q", dev, stdout.String())
	}
	return s, nil
}

// MkfsOptions tune MakeFS.
type MkfsOptions struct {
	// Label is the file system label ("" for none).
	Label string
	// Discard lets mkfs discard the whole device first (off: it writes no discard).
	Discard bool
}

// MakeFS creates a file system of type fsType on dev, but only if Probe finds nothing
// there, nor an ext2/3/4 backup superblock (the remains of a file system whose primary
// superblock was damaged, which blkid does not see): a device that holds any of these
// fails with an error that names it and wraps ErrNotEmpty. Only ext4 is supported. ext4 is created with 4 KiB blocks and
// lazy_itable_init=1 (the kernel zeroes the inode tables in the background after the
// first mount, so mkfs of a large volume takes seconds), lazy_journal_init=0 (the
// journal is written now: on an encrypted volume it would otherwise start as noise)
// and, unless opts.Discard, nodiscard. mke2fs runs without -F and with no terminal,
// so it refuses on its own any device it finds in use or already formatted.
func MakeFS(dev, fsType string, opts MkfsOptions) error {
	if fsType != "ext4" {
		return fmt.Errorf("make a file system on %s: creating %q is not supported: %w; create it yourself, then mount it", dev, fsType, ErrUnsupportedFS)
	}
	sig, err := Probe(dev)
	if err != nil {
		return fmt.Errorf("make a file system on %s: %w", dev, err)
	}
	if !sig.Empty() {
		return fmt.Errorf("make a file system on %s: it holds %s: %w", dev, sig, ErrNotEmpty)
	}
	if at, err := backupSuperblock(dev); err != nil {
		return fmt.Errorf("make a file system on %s: %w", dev, err)
	} else if at != "" {
		return fmt.Errorf("make a file system on %s: blkid finds nothing, but there is an ext2/3/4 backup superblock at %s: the primary superblock is damaged (e2fsck -b can repair it): %w", dev, at, ErrNotEmpty)
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		return fmt.Errorf("make a file system on %s: mkfs.ext4 (e2fsprogs) is not installed: %w", dev, err)
	}
	ext := "lazy_itable_init=1,lazy_journal_init=0"
	if !opts.Discard {
		ext += ",nodiscard"
	}
	args := []string{"-q", "-b", "4096", "-E", ext}
	if opts.Label != "" {
		if len(opts.Label) > 16 {
			return fmt.Errorf("make a file system on %s: label %q is longer than 16 bytes", dev, opts.Label)
		}
		args = append(args, "-L", opts.Label)
	}
	args = append(args, dev)
	cmd := exec.Command(mkfs, args...)
	cmd.Env = []string{"LC_ALL=C", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("make a file system on %s: mkfs.ext4: %w: %s", dev, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// backupSuperblock looks for the first backup superblock of an ext2/3/4 file system
// (in block group 1, for block sizes 1, 2 and 4 KiB) on dev, which blkid does not:
// it only reads the primary one. A file system whose primary superblock was damaged
// reads as nothing to blkid, but its data is still there and e2fsck can recover it;
// MakeFS must not format over it. It returns where it found one ("" if nowhere).
func backupSuperblock(dev string) (string, error) {
	f, err := os.Open(dev)
	if err != nil {
		return "", err
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return "", err
	}
	for _, c := range []struct {
		block, blockSize int64
	}{{8193, 1024}, {16384, 2048}, {32768, 4096}} {
		off := c.block * c.blockSize
		sb := make([]byte, 1024)
		if off+int64(len(sb)) > size {
			continue
		}
		if _, err := f.ReadAt(sb, off); err != nil {
			return "", fmt.Errorf("read %s at %d: %w", dev, off, err)
		}
		magic := binary.LittleEndian.Uint16(sb[0x38:])
		logBlock := binary.LittleEndian.Uint32(sb[0x18:]) // block size = 1024 << s_log_block_size
		group := binary.LittleEndian.Uint16(sb[0x5A:])    // s_block_group_nr of this copy
		if magic == 0xEF53 && int64(1024)<<logBlock == c.blockSize && group == 1 {
			return fmt.Sprintf("block %d (%d-byte blocks)", c.block, c.blockSize), nil
		}
	}
	return "", nil
}
