// Package proc reads what the project needs to know of a process from /proc: its start
// time, which tells it apart from a later process that reuses its pid, and its command
// name. Its functions are safe for concurrent use.
package proc

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// StartTime returns the start time of process pid (proc(5) stat field 22, in clock ticks
// since boot) and whether it has exited (a zombie, not yet reaped by its parent: the pid
// is still taken).
func StartTime(pid int) (start uint64, exited bool, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false, err
	}
	// The command name (field 2) may hold spaces and parentheses: fields start after
	// the last ')', with the state (field 3).
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, false, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, false, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	start, err = strconv.ParseUint(f[19], 10, 64) // field 22 is the 20th after the name
	if err != nil {
		return 0, false, fmt.Errorf("/proc/%d/stat: start time: %w", pid, err)
	}
	return start, f[0] == "Z" || f[0] == "X", nil
}

// Comm returns the command name of process pid (/proc/PID/comm), or "" if it cannot be
// read.
func Comm(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
