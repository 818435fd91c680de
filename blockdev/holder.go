package blockdev

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/internal/mountinfo"
)

// Finding who holds a drive that an exclusive open was refused: for the error message
// only, so every lookup is best effort and answers "" when it finds nothing.

// flockHolder names the process that holds a flock on the file open at fd, from
// /proc/locks (each line: "ID: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END", the
// device numbers in hex; waiters' lines have "->" after the ID).
func flockHolder(fd int) string {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return ""
	}
	holder := ""
	scanFields("/proc/locks", func(fields []string) bool {
		if len(fields) < 6 || fields[1] != "FLOCK" || fields[3] != "WRITE" {
			return true
		}
		id := strings.Split(fields[5], ":")
		if len(id) != 3 {
			return true
		}
		major, err1 := strconv.ParseUint(id[0], 16, 32)
		minor, err2 := strconv.ParseUint(id[1], 16, 32)
		ino, err3 := strconv.ParseUint(id[2], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil ||
			uint32(major) != unix.Major(st.Dev) || uint32(minor) != unix.Minor(st.Dev) || ino != st.Ino {
			return true
		}
		if pid, err := strconv.Atoi(fields[4]); err == nil && pid > 0 {
			holder = "locked by " + describeProcess(pid)
			return false
		}
		return true
	})
	return holder
}

// scanFields calls fn with the fields of each line of a /proc file until fn returns
// false; a file it cannot read has no lines.
func scanFields(path string, fn func(fields []string) bool) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() && fn(strings.Fields(sc.Text())) {
	}
}

// blockDeviceHolder says why the kernel refuses an exclusive open of the block device
// at path: a mount (/proc/self/mountinfo), a device stacked on it (its holders directory
// in sysfs), or else the processes that have it open (their descriptors in /proc), one
// of which holds it.
func blockDeviceHolder(path string) string {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return ""
	}
	devno := fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	if mp := mountOf(devno); mp != "" {
		return "mounted at " + mp
	}
	if holders, _ := os.ReadDir("/sys/dev/block/" + devno + "/holders"); len(holders) > 0 {
		var names []string
		for _, h := range holders {
			names = append(names, h.Name())
		}
		return "held by " + strings.Join(names, ", ")
	}
	if pids := openers(st.Rdev); len(pids) > 0 {
		var who []string
		for _, pid := range pids {
			who = append(who, describeProcess(pid))
		}
		return "open in " + strings.Join(who, "; ")
	}
	return ""
}

// mountOf returns the first mount point of the device "major:minor", or "".
func mountOf(devno string) string {
	mp := ""
	scanFields("/proc/self/mountinfo", func(fields []string) bool {
		// ID PARENT MAJOR:MINOR ROOT MOUNTPOINT ...
		if len(fields) > 4 && fields[2] == devno {
			mp = mountinfo.Unescape(fields[4])
			return false
		}
		return true
	})
	return mp
}

// maxOpeners bounds the processes blockDeviceHolder names.
const maxOpeners = 4

// openers lists the processes (up to maxOpeners) that have the block device rdev open.
func openers(rdev uint64) []int {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fds, err := os.ReadDir(filepath.Join("/proc", p.Name(), "fd"))
		if err != nil {
			continue
		}
		for _, fd := range fds {
			var st unix.Stat_t
			if unix.Stat(filepath.Join("/proc", p.Name(), "fd", fd.Name()), &st) == nil &&
				st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == rdev {
				pids = append(pids, pid)
				break
			}
		}
		if len(pids) == maxOpeners {
			break
		}
	}
	return pids
}

// describeProcess names a process by pid and command line (or command name), shortened.
func describeProcess(pid int) string {
	const maxLen = 100
	what := ""
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil {
		what = strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
	}
	if what == "" {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil {
			what = strings.TrimSpace(string(b))
		}
	}
	if len(what) > maxLen {
		what = what[:maxLen] + "..."
	}
	if pid == os.Getpid() {
		what = strings.TrimPrefix(what+", this process", ", ")
	}
	if what == "" {
		return fmt.Sprintf("pid %d", pid)
	}
	return fmt.Sprintf("pid %d (%s)", pid, what)
}
