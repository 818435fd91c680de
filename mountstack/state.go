package mountstack

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/atrest/atrest/internal/proc"
)

// StateDir holds one JSON file per stack that Mount set up (State), so that Unmount
// finds every piece, also after a crash.
const StateDir = "/run/atrest/mounts"

// State is what Mount records in StateDir for Unmount. The JSON form is a stable
// format: `atrest umount` of one version reads what `atrest mount` of another wrote.
type State struct {
	Mountpoint string `json:"mountpoint"`
	FUSEDir    string `json:"fuse_dir"`
	File       string `json:"file"`           // the FUSE file the loop device is attached to
	Loop       string `json:"loop,omitempty"` // set once attached
	PID        int    `json:"pid"`
	StartTime  uint64 `json:"start_time"` // of PID, in clock ticks since boot (proc(5) stat field 22)
	NBD        string `json:"nbd"`
	Export     string `json:"export"`
	// IOTimeout is Options.IOTimeout as time.Duration writes it ("3m0s"); absent in the
	// files of versions before it.
	IOTimeout string `json:"io_timeout,omitempty"`
	// Lost is set by a mount process that ends without flushing its NBD client (it
	// abandoned the stack, see Stack.Abandon, or Close could not flush), with what the
	// client held that the server had not made durable, lost with the process:
	// LostWrites writes (trims and zeroings included) of LostBytes bytes in all (-1:
	// unknown). Unmount reports it.
	Lost       bool  `json:"lost,omitempty"`
	LostWrites int   `json:"lost_writes,omitempty"`
	LostBytes  int64 `json:"lost_bytes,omitempty"`
	// VolumeID is the volume identity the server advertised (nbd.Client.VolumeID), set
	// once connected; absent for servers that advertise none.
	VolumeID string `json:"volume_id,omitempty"`
}

// AbsMountpoint returns p as Mount and Unmount name it (and its state file): absolute,
// with symbolic links resolved where p exists.
func AbsMountpoint(p string) (string, error) {
	mp, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	if r, err := filepath.EvalSymlinks(mp); err == nil {
		mp = r
	}
	return mp, nil
}

// StatePath is the state file of a mount point (an AbsMountpoint): its path escaped as
// systemd-escape --path does (so /srv/vol1 is srv-vol1.json, like the unit
// atrest-mount@srv-vol1).
func StatePath(mountpoint string) string {
	return filepath.Join(StateDir, escapePath(mountpoint)+".json")
}

// escapePath escapes an absolute path into one file name, as systemd-escape --path
// does: slashes become '-', other bytes outside [A-Za-z0-9:_.] (and a leading '.')
// become \xNN. A result too long for a file name is replaced by a hash.
func escapePath(p string) string {
	p = strings.Trim(filepath.Clean(p), "/")
	if p == "" {
		return "-"
	}
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case c == '/':
			b.WriteByte('-')
		case c == '.' && i == 0:
			fmt.Fprintf(&b, `\x%02x`, c)
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == ':', c == '_', c == '.':
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, `\x%02x`, c)
		}
	}
	if b.Len() > 200 {
		sum := sha256.Sum256([]byte(p))
		return "sha256-" + hex.EncodeToString(sum[:16])
	}
	return b.String()
}

// ReadState reads the state file of a mount point (an AbsMountpoint). Without one, the
// error wraps os.ErrNotExist; a state file that cannot be parsed fails with an error
// naming it.
func ReadState(mountpoint string) (*State, error) {
	return readStateFile(StatePath(mountpoint))
}

func readStateFile(path string) (*State, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("state file %s: %w", path, err)
	}
	return &s, nil
}

// liveMount returns the state of a stack, other than the one on except, that a live
// process serves and that match accepts; nil if there is none. State files that
// cannot be read are skipped: Mount and Unmount of their mount points report them.
func liveMount(except string, match func(*State) bool) *State {
	paths, _ := filepath.Glob(filepath.Join(StateDir, "*.json"))
	for _, p := range paths {
		s, err := readStateFile(p)
		if err == nil && s.Mountpoint != except && match(s) && s.Alive() {
			return s
		}
	}
	return nil
}

// marshalState is the content of a state file.
func marshalState(s *State) ([]byte, error) {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// writeState replaces the state file atomically.
func writeState(s *State) error {
	if err := os.MkdirAll(StateDir, 0o700); err != nil {
		return err
	}
	data, err := marshalState(s)
	if err != nil {
		return err
	}
	p := StatePath(s.Mountpoint)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

func removeState(mountpoint string) error {
	err := os.Remove(StatePath(mountpoint))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// Alive reports whether the process that wrote s still runs: the same pid with the
// same start time, not a zombie.
func (s *State) Alive() bool {
	st, exited, err := proc.StartTime(s.PID)
	return err == nil && !exited && st == s.StartTime
}
