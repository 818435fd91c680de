package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/registry"
)

func init() {
	register(&cli.Command{
		Name:  "drive",
		Usage: "format, adopt and list the drives of the cluster",
		Subcommands: []*cli.Command{
			{
				Name:      "format",
				Usage:     "write a LUKS2 header with a new data key wrapped by the master key, and register the drive",
				ArgsUsage: "PATH",
				Flags: []cli.Flag{
					keystoreFlag(),
					&cli.StringFlag{Name: "volume", Usage: "volume name (default: the first free volN)"},
					&cli.IntFlag{Name: "sector-size", Value: 4096, Usage: "data sector size, 4096 or 512"},
					&cli.StringFlag{Name: "create", Usage: "create PATH as a sparse image file of this size (e.g. 1G)"},
					&cli.BoolFlag{Name: "force", Usage: "format even if PATH holds a LUKS header, a file system or a partition table"},
					&cli.BoolFlag{Name: "allow-discards", Usage: "pass discards (TRIM) to the drive: reveals which sectors are unused"},
					&cli.BoolFlag{Name: "wipe", Usage: "fill the data area with encrypted zeroes (slow; hides the old contents)"},
				},
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return usagef("drive format takes one PATH")
					}
					o := formatOptions{
						keystore: c.String("keystore"), path: c.Args().First(), volume: c.String("volume"),
						sectorSize: c.Int("sector-size"), force: c.Bool("force"),
						allowDiscards: c.Bool("allow-discards"), wipe: c.Bool("wipe"), out: c.App.Writer, errOut: c.App.ErrWriter,
					}
					if s := c.String("create"); s != "" {
						n, err := parseSize(s)
						if err != nil {
							return usageError(err)
						}
						o.create = n
					}
					return runFormat(c.Context, o)
				},
			},
			{
				Name:      "adopt",
				Usage:     "bring an existing LUKS2 drive into the cluster, keeping its data",
				ArgsUsage: "PATH",
				Description: "Opens PATH with --key-file, adds a keyslot wrapped by the master key, writes the atrest\n" +
					"token, then wipes the keyslot the old key file opened (unless --keep-old-keyslot).\n" +
					"The drive must use aes-xts-plain64 with a 512-bit key (cryptsetup's default).",
				Flags: []cli.Flag{
					keystoreFlag(),
					&cli.StringFlag{Name: "key-file", Usage: "key file that opens the drive now (required)"},
					&cli.StringFlag{Name: "volume", Usage: "volume name (default: the first free volN)"},
					&cli.BoolFlag{Name: "keep-old-keyslot", Usage: "keep the keyslot the old key file opens"},
				},
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return usagef("drive adopt takes one PATH")
					}
					if c.String("key-file") == "" {
						return usagef("drive adopt needs --key-file: the key file that opens the drive now")
					}
					return runAdopt(c.Context, adoptOptions{
						keystore: c.String("keystore"), path: c.Args().First(), keyFile: c.String("key-file"),
						volume: c.String("volume"), keepOld: c.Bool("keep-old-keyslot"), out: c.App.Writer,
					})
				},
			},
			{
				Name:  "list",
				Usage: "list the drives of the cluster",
				Flags: []cli.Flag{keystoreFlag(), &cli.BoolFlag{Name: "json", Usage: "print JSON"}},
				Action: func(c *cli.Context) error {
					if c.NArg() != 0 {
						return usagef("drive list takes no arguments")
					}
					return runDriveList(c.Context, driveListOptions{keystore: c.String("keystore"), json: c.Bool("json"), out: c.App.Writer})
				},
			},
		},
	})
}

type formatOptions struct {
	keystore, path, volume string
	sectorSize             int
	create                 int64
	force, allowDiscards   bool
	wipe                   bool
	out, errOut            io.Writer
}

func runFormat(ctx context.Context, o formatOptions) (err error) {
	// The registry keeps absolute paths: the daemon runs elsewhere.
	if o.path, err = filepath.Abs(o.path); err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	if o.sectorSize != 512 && o.sectorSize != 4096 {
		return usagef("--sector-size %d: use 4096 or 512", o.sectorSize)
	}
	if o.volume != "" && !registry.ValidVolumeName(o.volume) {
		return usagef("--volume %q: use 1 to 64 letters, digits, '.', '_' or '-'", o.volume)
	}
	if min := int64(luks2.DataOffset + o.sectorSize); o.create > 0 && o.create < min {
		return usagef("--create: %d bytes is too small for a drive: its header area alone takes %d bytes, and one data sector more makes %d", o.create, luks2.DataOffset, min)
	}
	if err := checkDrivePath(o.path, o.create > 0); err != nil {
		return err
	}
	// The lock first: nothing is created or checked while another command runs.
	l, err := lockOffline(ctx, o.keystore)
	if err != nil {
		return keystoreError(err)
	}
	defer l.Close()
	if o.create > 0 {
		var created bool
		if created, err = createImage(o.path, o.force); err != nil {
			return err
		}
		if created {
			// A failed command leaves no image behind for its rerun to trip over.
			defer func() {
				if err != nil {
					os.Remove(o.path)
				}
			}()
		}
	}
	// Held while PATH is checked and (for --create) sized, so that neither happens to
	// a drive that a daemon serves; the format holds it again to write.
	hold, err := drive.Open(o.path, drive.OpenOptions{Exclusive: true})
	if err != nil {
		return keystoreError(err)
	}
	err = prepareDrive(hold, o)
	hold.Close()
	if err != nil {
		return err
	}
	req := formatRequest{path: o.path, volume: o.volume, sectorSize: o.sectorSize, allowDiscards: o.allowDiscards}
	if o.wipe {
		req.wipe = func(dev *blockcrypt.Device) error { return wipeDevice(ctx, dev, o.errOut) }
	}
	d, _, err := formatOffline(ctx, l, req)
	if err != nil {
		return keystoreError(err)
	}
	fmt.Fprintf(o.out, "Formatted %s: drive %s, volume %s, sector size %d\n", d.Path, d.UUID, d.Volume, d.SectorSize)
	return nil
}

// checkDrivePath refuses a PATH that cannot be a drive: a directory or anything else
// that is neither a regular file nor a block device, or (without --create) nothing.
func checkDrivePath(path string, create bool) error {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist) && create:
		return nil
	case errors.Is(err, os.ErrNotExist):
		return fail(exitcodes.DriveMissing, err, "check the path; --create SIZE makes an image file")
	case err != nil:
		return fail(exitcodes.Failure, err, "")
	case fi.IsDir():
		return usagef("%s is a directory: name a block device or an image file", path)
	case fi.Mode().IsRegular():
		return nil
	case fi.Mode()&os.ModeDevice == 0 || fi.Mode()&os.ModeCharDevice != 0:
		return usagef("%s is neither a block device nor a regular file", path)
	case create:
		return usagef("%s is a block device: --create makes an image file", path)
	}
	return nil
}

// createImage creates PATH for --create, empty; it reports whether it created it (with
// force an existing file is kept, and sized by prepareDrive once it is held).
func createImage(path string, force bool) (created bool, err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	switch {
	case err == nil:
		return true, f.Close()
	case errors.Is(err, os.ErrExist) && force:
		return false, nil
	case errors.Is(err, os.ErrExist):
		return false, fail(exitcodes.Exists, err, "--create makes a new file; rerun with --force to replace it, or drop --create")
	}
	return false, fail(exitcodes.Failure, err, "")
}

// prepareDrive, with the drive held exclusively, refuses one that holds something
// (unless --force) and makes a --create image the size asked for, sparse and empty.
func prepareDrive(hold *blockdev.File, o formatOptions) error {
	if !o.force {
		found, err := signatures(hold, o.path)
		if err != nil {
			return keystoreError(err)
		}
		if len(found) > 0 {
			return fail(exitcodes.Exists, fmt.Errorf("%s holds %s", o.path, strings.Join(found, ", ")),
				"formatting destroys it; rerun with --force if that is what you want")
		}
	}
	if o.create > 0 {
		if err := os.Truncate(o.path, 0); err != nil {
			return keystoreError(err)
		}
		if err := os.Truncate(o.path, o.create); err != nil {
			return keystoreError(err)
		}
	}
	return nil
}

// wipeDevice writes encrypted zeroes over the whole data area, with progress on a
// terminal.
func wipeDevice(ctx context.Context, dev *blockcrypt.Device, w io.Writer) error {
	buf := make([]byte, 4<<20)
	size := dev.Size()
	last := time.Now()
	for off := int64(0); off < size; off += int64(len(buf)) {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(int64(len(buf)), size-off)
		if _, err := dev.WriteAt(buf[:n], off); err != nil {
			return err
		}
		if time.Since(last) > 500*time.Millisecond && onTerminal(w) {
			fmt.Fprintf(w, "\rwiping: %3d%%", off*100/size)
			last = time.Now()
		}
	}
	if onTerminal(w) {
		fmt.Fprintf(w, "\rwiping: 100%%\n")
	}
	return nil
}

// signatures lists what the drive at path (open as dev) holds that formatting would
// destroy: atrest reads the signatures it knows itself, and asks `blkid -p` (low-level
// probing, no cache) for the others when it is installed.
func signatures(dev io.ReaderAt, path string) ([]string, error) {
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

type adoptOptions struct {
	keystore, path, keyFile, volume string
	keepOld                         bool
	out                             io.Writer
}

func runAdopt(ctx context.Context, o adoptOptions) error {
	if o.volume != "" && !registry.ValidVolumeName(o.volume) {
		return usagef("--volume %q: use 1 to 64 letters, digits, '.', '_' or '-'", o.volume)
	}
	var err error
	if o.path, err = filepath.Abs(o.path); err != nil {
		return fail(exitcodes.Failure, err, "")
	}
	key, err := os.ReadFile(o.keyFile)
	switch {
	case errors.Is(err, os.ErrNotExist), errors.Is(err, syscall.EISDIR):
		return usageError(fmt.Errorf("--key-file: %w", err))
	case err != nil:
		return fail(exitcodes.Failure, fmt.Errorf("--key-file: %w", err), "")
	}
	defer clear(key)
	l, err := lockOffline(ctx, o.keystore)
	if err != nil {
		return keystoreError(err)
	}
	defer l.Close()
	d, r, err := formatOffline(ctx, l, formatRequest{path: o.path, volume: o.volume, adoptKey: key, keepOldKeyslot: o.keepOld})
	if err != nil {
		if errors.Is(err, luks2.ErrWrongKey) {
			return fail(exitcodes.Key, err, "the key file does not open this drive; nothing was changed")
		}
		return keystoreError(err)
	}
	fmt.Fprintf(o.out, "Adopted %s: drive %s, volume %s, sector size %d\n", d.Path, d.UUID, d.Volume, d.SectorSize)
	if !o.keepOld {
		fmt.Fprintf(o.out, "Wiped keyslot %d (the old key file no longer opens the drive)\n", r.OldSlot)
	}
	for _, s := range r.OtherSlots {
		fmt.Fprintf(o.out, "Warning: keyslot %d is not managed by atrest and still opens the drive; remove it with 'cryptsetup luksKillSlot %s %d'\n", s, d.Path, s)
	}
	return nil
}

type driveListOptions struct {
	keystore string
	json     bool
	out      io.Writer
}

// driveListEntry is one line of `atrest drive list --json`.
type driveListEntry struct {
	keystore.LegacyDrive
	// Present: at its path and `atrest serve` opens it (the checks of encryption-status).
	Present bool `json:"present"`
	// Detail says why a drive is not present.
	Detail string `json:"detail,omitempty"`
}

func runDriveList(ctx context.Context, o driveListOptions) error {
	k, r, err := openOffline(ctx, o.keystore)
	if err != nil {
		return keystoreError(err)
	}
	// The checks of encryption-status, which are those of serve.
	st, err := offlineStatus(k, r)
	if err != nil {
		return keystoreError(err)
	}
	list := []driveListEntry{}
	for i, d := range legacyDrives(r) {
		e := driveListEntry{LegacyDrive: d, Present: st.Drives[i].servable()}
		if !e.Present {
			e.Detail = st.Drives[i].State
			if s := st.Drives[i].Detail; s != "" {
				e.Detail += ": " + s
			}
		}
		list = append(list, e)
	}
	if o.json {
		b, _ := json.MarshalIndent(list, "", "  ")
		_, err := fmt.Fprintf(o.out, "%s\n", b)
		return err
	}
	tw := tabwriter.NewWriter(o.out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "UUID\tVOLUME\tMEMBER\tSECTOR\tKEY ID\tSTATE\tPRESENT\tPATH")
	for _, e := range list {
		p := "no"
		if e.Present {
			p = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d/%d\t%d\t%s\t%s\t%s\t%s\n", e.UUID, e.Volume, e.MemberIndex+1, e.MemberCount, e.SectorSize, e.KeyID, e.State, p, e.Path)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, e := range list {
		if e.Detail != "" {
			fmt.Fprintf(o.out, "  %s: %s\n", e.UUID, e.Detail)
		}
	}
	return nil
}
