package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/drive"
	"github.com/atrest/atrest/keystore"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/registry"
)

// AddDrive formats the drive at req.Path (or, with AdoptKeyFile, adopts a LUKS2 drive
// formatted elsewhere) and registers it: as a new volume of layout single, or, for a
// registered drive formatted again, as the replacement of that member. It runs under
// both locks (custody, then registry), holds the drive exclusively while it checks and
// writes it (a drive that a daemon serves or a program has open is refused as busy),
// refuses a drive that holds something (a LUKS header, a file system, a partition
// table) unless Force, and removes an image it created when it fails. A serving node
// exports the new volume at once.
func (n *Node) AddDrive(ctx context.Context, req AddDriveRequest) (res *AddDriveResult, err error) {
	if err := checkAddDrive(&req); err != nil {
		return nil, err
	}
	var adoptKey []byte
	if req.AdoptKeyFile != "" {
		if adoptKey, err = readKeyFile(req.AdoptKeyFile); err != nil {
			return nil, err
		}
		defer clear(adoptKey)
	}
	// The lock first: nothing is created or checked while another command runs.
	l, err := n.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	if req.Create > 0 {
		created, cerr := createImage(req.Path, req.Force)
		if cerr != nil {
			return nil, cerr
		}
		if created {
			// A failed request leaves no image behind for its rerun to trip over.
			defer func() {
				if err != nil {
					os.Remove(req.Path)
				}
			}()
		}
	}
	if err := prepareDrive(req); err != nil {
		return nil, err
	}
	d, adopted, err := n.formatLocked(ctx, l, req, adoptKey)
	if err != nil {
		return nil, err
	}
	res = &AddDriveResult{}
	if adopted != nil {
		slot := adopted.OldSlot
		res.OldKeyslot, res.OtherKeyslot = &slot, adopted.OtherSlots
	}
	if n.serving() {
		if err := n.serveVolume(ctx, d.VolumeUUID); err != nil {
			// The drive is formatted and registered: what failed is serving it, which
			// the status reports and a restart retries.
			n.log.Error("serve the new volume", "volume", d.VolumeUUID, "err", err)
		} else {
			res.Exported = true
		}
	}
	st, err := n.Drive(ctx, d.UUID)
	if err != nil {
		return nil, err
	}
	res.Drive = *st
	n.emit(Event{Type: EventDriveAdded, Volume: st.Volume, Drive: st.UUID, Path: st.Path,
		Message: fmt.Sprintf("drive %s added at %s: volume %s", st.UUID, st.Path, st.Volume)})
	return res, nil
}

// checkAddDrive refuses a malformed request before anything is locked or touched.
func checkAddDrive(req *AddDriveRequest) error {
	switch {
	case req.Path == "" || !filepath.IsAbs(req.Path):
		return fmt.Errorf("drive path %q: want an absolute path: %w", req.Path, ErrInvalid)
	case strings.ContainsAny(req.Path, "\x00\n"):
		return fmt.Errorf("drive path %q: control characters: %w", req.Path, ErrInvalid)
	case req.Volume != "" && !registry.ValidVolumeName(req.Volume):
		return fmt.Errorf("volume name %q: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit: %w", req.Volume, ErrInvalid)
	case req.Create < 0:
		return fmt.Errorf("create size %d: %w", req.Create, ErrInvalid)
	}
	req.Path = filepath.Clean(req.Path)
	if req.AdoptKeyFile != "" {
		if !filepath.IsAbs(req.AdoptKeyFile) {
			return fmt.Errorf("key file %q: want an absolute path: %w", req.AdoptKeyFile, ErrInvalid)
		}
		if req.Create > 0 || req.Wipe || req.Force || req.SectorSize != 0 || req.AllowDiscards {
			return fmt.Errorf("adopting keeps the drive's data and format: create, wipe, force, sector size and allow-discards do not apply: %w", ErrInvalid)
		}
	} else {
		if req.SectorSize == 0 {
			req.SectorSize = 4096
		}
		if req.SectorSize != 512 && req.SectorSize != 4096 {
			return fmt.Errorf("sector size %d: use 4096 or 512: %w", req.SectorSize, ErrInvalid)
		}
		if min := int64(luks2.DataOffset + req.SectorSize); req.Create > 0 && req.Create < min {
			return fmt.Errorf("create size %d bytes is too small for a drive: its header area alone takes %d bytes, and one data sector more makes %d: %w", req.Create, luks2.DataOffset, min, ErrInvalid)
		}
	}
	fi, err := os.Stat(req.Path)
	switch {
	case errors.Is(err, os.ErrNotExist) && req.Create > 0:
		return nil
	case err != nil:
		return err
	case fi.IsDir():
		return fmt.Errorf("%s is a directory: name a block device or an image file: %w", req.Path, ErrInvalid)
	case fi.Mode().IsRegular():
		return nil
	case fi.Mode()&os.ModeDevice == 0 || fi.Mode()&os.ModeCharDevice != 0:
		return fmt.Errorf("%s is neither a block device nor a regular file: %w", req.Path, ErrInvalid)
	case req.Create > 0:
		return fmt.Errorf("%s is a block device: create makes an image file: %w", req.Path, ErrInvalid)
	}
	return nil
}

// readKeyFile reads the key file of an adoption: at most 8 KiB (cryptsetup's default
// keyfile size limit is far above any real key, and a larger file is not a key).
func readKeyFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 8<<10+1))
	switch {
	case err != nil:
		clear(b)
		return nil, fmt.Errorf("read key file %s: %w", path, err)
	case len(b) == 0:
		return nil, fmt.Errorf("key file %s is empty: %w", path, ErrInvalid)
	case len(b) > 8<<10:
		clear(b)
		return nil, fmt.Errorf("key file %s is larger than 8 KiB: %w", path, ErrInvalid)
	}
	return b, nil
}

// createImage creates the image file of a request with Create, empty; it reports
// whether it created it (with Force an existing file is kept, and sized by
// prepareDrive once it is held).
func createImage(path string, force bool) (created bool, err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	switch {
	case err == nil:
		return true, f.Close()
	case errors.Is(err, os.ErrExist) && force:
		return false, nil
	case errors.Is(err, os.ErrExist):
		return false, fmt.Errorf("create %s: %w: %w", path, ErrConflict, err)
	}
	return false, err
}

// prepareDrive, with the drive held exclusively (so that neither happens to a drive a
// daemon serves), refuses one that holds something unless Force, and makes a Create
// image the size asked for, sparse and empty. The format holds it again to write.
func prepareDrive(req AddDriveRequest) error {
	hold, err := drive.Open(req.Path, drive.OpenOptions{Exclusive: true})
	if err != nil {
		return err
	}
	defer hold.Close()
	if !req.Force && req.AdoptKeyFile == "" {
		found, err := drive.Signatures(hold, req.Path)
		if err != nil {
			return err
		}
		if len(found) > 0 {
			return &HoldsDataError{Path: req.Path, Found: found}
		}
	}
	if req.Create > 0 {
		if err := os.Truncate(req.Path, 0); err != nil {
			return err
		}
		if err := os.Truncate(req.Path, req.Create); err != nil {
			return err
		}
	}
	return nil
}

// HoldsDataError: a drive to format holds data that formatting would destroy (and the
// request did not say Force).
type HoldsDataError struct {
	Path  string
	Found []string
}

func (e *HoldsDataError) Error() string {
	return fmt.Sprintf("%s holds %s", e.Path, strings.Join(e.Found, ", "))
}

// Is makes a HoldsDataError match ErrHoldsData and ErrConflict.
func (e *HoldsDataError) Is(target error) bool {
	return target == ErrHoldsData || target == ErrConflict
}

// formatLocked formats or adopts the drive and records it in the registry, under the
// registry lock (the custody lock l held).
func (n *Node) formatLocked(ctx context.Context, l *keystore.Locked, req AddDriveRequest, adoptKey []byte) (*registry.Drive, *drive.Adopted, error) {
	key, err := l.MasterKey()
	if err != nil {
		return nil, nil, err
	}
	defer clear(key.Key)
	tx, err := n.begin(ctx, l)
	if err != nil {
		return nil, nil, err
	}
	defer tx.Close()
	r := tx.Registry()
	dev, err := drive.Open(req.Path, drive.OpenOptions{Exclusive: true})
	if err != nil {
		return nil, nil, err
	}
	defer dev.Close()
	in, inspectErr := drive.Inspect(dev, req.Path)
	var old *registry.Drive
	if inspectErr == nil {
		old = r.Drive(in.UUID)
	}
	token := luks2.AtrestToken{ClusterUUID: l.ClusterUUID(), Volume: req.Volume, MemberCount: 1}
	if old != nil {
		v := r.VolumeByUUID(old.VolumeUUID)
		if adoptKey != nil {
			return nil, nil, fmt.Errorf("%s: drive %s is already registered (volume %s): %w", req.Path, old.UUID, v.Name, registry.ErrExists)
		}
		if token.Volume == "" {
			token.Volume = v.Name
		} else if token.Volume != v.Name {
			if _, err := r.NewVolumeName(token.Volume); err != nil {
				return nil, nil, err
			}
		}
		token.VolumeUUID, token.MemberIndex, token.MemberCount = v.UUID, old.MemberIndex, len(v.Members)
	} else {
		if token.Volume, err = r.NewVolumeName(token.Volume); err != nil {
			return nil, nil, err
		}
		token.VolumeUUID = uuid.NewString()
	}
	var adopted *drive.Adopted
	if adoptKey != nil {
		adopted, err = drive.Adopt(dev, req.Path, drive.AdoptOptions{OldKey: adoptKey, Key: key, Token: token, KeepOldKeyslot: req.KeepOldKeyslot})
		if adopted != nil {
			in = &adopted.Info
		}
	} else {
		fo := drive.FormatOptions{Key: key, Token: token, SectorSize: req.SectorSize, AllowDiscards: req.AllowDiscards}
		if req.Wipe {
			fo.Wipe = func(dev *blockcrypt.Device) error { return wipe(ctx, dev, req.Progress) }
		}
		in, err = drive.Format(dev, req.Path, fo)
	}
	if err != nil {
		return nil, nil, err
	}
	now := n.now().Truncate(time.Second)
	d := registry.Drive{UUID: in.UUID, KeyID: key.ID, Path: req.Path, SectorSize: in.SectorSize, State: registry.DriveActive, Added: now}
	if old != nil {
		if err := r.ReplaceMember(old.UUID, d); err != nil {
			return nil, nil, err
		}
		r.VolumeByUUID(token.VolumeUUID).Name = token.Volume
	} else if err := r.AddVolume(registry.Volume{UUID: token.VolumeUUID, Name: token.Volume, Layout: registry.LayoutSingle, Created: now}, []registry.Drive{d}); err != nil {
		return nil, nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, nil, err
	}
	out := *r.Drive(d.UUID)
	return &out, adopted, nil
}

// wipe writes encrypted zeroes over the whole data area, calling progress as it goes.
func wipe(ctx context.Context, dev *blockcrypt.Device, progress func(done, total int64)) error {
	buf := make([]byte, 4<<20)
	size := dev.Size()
	for off := int64(0); off < size; off += int64(len(buf)) {
		if err := ctx.Err(); err != nil {
			return err
		}
		m := min(int64(len(buf)), size-off)
		if _, err := dev.WriteAt(buf[:m], off); err != nil {
			return err
		}
		if progress != nil {
			progress(off+m, size)
		}
	}
	return nil
}
