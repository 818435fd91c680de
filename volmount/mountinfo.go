package volmount

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/atrest/atrest/internal/mountinfo"
)

// mountEntry is one line of /proc/self/mountinfo (proc(5)).
type mountEntry struct {
	major, minor uint32 // st_dev of the mounted file system
	mountpoint   string
	fsType       string
	source       string
}

// readMounts parses /proc/self/mountinfo.
func readMounts() ([]mountEntry, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read the mount table: %w", err)
	}
	return parseMountinfo(data)
}

// parseMountinfo parses the text of a mountinfo file:
//
//	36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//
// (ID, parent ID, major:minor, root, mount point, options, optional fields ending with
// "-", file system type, source, super options).
func parseMountinfo(data []byte) ([]mountEntry, error) {
	var out []mountEntry
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" {
			continue
		}
		f := strings.Fields(line)
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if len(f) < 7 || sep < 0 || sep+2 >= len(f) {
			return nil, fmt.Errorf("mountinfo line %d is malformed: %q", n, line)
		}
		majStr, minStr, ok := strings.Cut(f[2], ":")
		maj, err1 := strconv.ParseUint(majStr, 10, 32)
		mnr, err2 := strconv.ParseUint(minStr, 10, 32)
		if !ok || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("mountinfo line %d has a bad device number %q", n, f[2])
		}
		out = append(out, mountEntry{
			major:      uint32(maj),
			minor:      uint32(mnr),
			mountpoint: mountinfo.Unescape(f[4]),
			fsType:     f[sep+1],
			source:     mountinfo.Unescape(f[sep+2]),
		})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read the mount table: %w", err)
	}
	return out, nil
}

// mountAt returns the topmost mount whose mount point is path, if any.
func mountAt(mounts []mountEntry, path string) (mountEntry, bool) {
	for i := len(mounts) - 1; i >= 0; i-- {
		if mounts[i].mountpoint == path {
			return mounts[i], true
		}
	}
	return mountEntry{}, false
}
