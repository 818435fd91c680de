package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/atrest/atrest/internal/mountinfo"
	"github.com/atrest/atrest/mountstack"
)

// imagesFile, in the work directory, names the directory of the run's drive images
// (in tmpfs), for the sweep.
const imagesFile = "images-dir"

// sweep finds and removes whatever a run with this work directory left behind: file
// systems mounted under it (an `atrest mount` stack through `atrest umount`), loop
// devices over its images, processes started by it (marked with markerEnv), its
// image directory. It returns what it found. The cleanup registry takes everything
// down in order; the sweep is the check that it did, and the cleanup after a run
// that was killed outright (bench/run.sh calls it on exit).
func sweep(work string) (found []string) {
	work = filepath.Clean(work)
	images := ""
	if b, err := os.ReadFile(filepath.Join(work, imagesFile)); err == nil {
		images = strings.TrimSpace(string(b))
	}
	under := func(p, dir string) bool {
		return dir != "" && (p == dir || strings.HasPrefix(p, dir+"/"))
	}
	note := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		found = append(found, msg)
		fmt.Fprintln(os.Stderr, "benchrun sweep: "+msg)
	}

	// fio first: it holds files open on the mounts and connections to the servers.
	marked := markedProcs(work)
	var fios []int
	for _, p := range marked {
		if p.comm == "fio" {
			note("fio (process %d): SIGKILL", p.pid)
			syscall.Kill(p.pid, syscall.SIGKILL)
			fios = append(fios, p.pid)
		}
	}
	waitGone(fios, 5*time.Second)

	// The `atrest mount` stacks, while their servers still run (the servers stop last:
	// a stack whose server is gone cannot flush, and its unmount waits for it).
	atrest := filepath.Join(work, "bin", "atrest")
	for _, m := range mountsUnder(work) {
		if _, err := os.Stat(mountstack.StatePath(m.dir)); err == nil {
			if _, err := os.Stat(atrest); err == nil {
				note("atrest mount stack on %s: atrest umount", m.dir)
				if err := runQuiet(60*time.Second, nil, atrest, "umount", m.dir); err != nil {
					note("%v", err)
					abortFUSE(work, note)
				}
			}
		}
	}
	// Other mounts, deepest first: ext4 before the FUSE mount its loop device sits on.
	// Should one hang (a FUSE daemon whose server is gone), the FUSE connections are
	// aborted: their requests then fail at once and the unmount goes through.
	for _, m := range mountsUnder(work) {
		if strings.HasPrefix(m.fstype, "fuse") {
			continue
		}
		note("%s mount %s: umount", m.fstype, m.dir)
		if runQuiet(30*time.Second, nil, "umount", m.dir) != nil {
			abortFUSE(work, note)
			runQuiet(30*time.Second, nil, "umount", "-l", m.dir)
		}
	}

	// Loop devices over the images or a file under the work directory.
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range loops {
		b, err := os.ReadFile(bf)
		if err != nil {
			continue
		}
		back := strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
		if under(back, images) || under(back, work) {
			dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(bf)))
			note("loop device %s over %s: losetup -d", dev, back)
			runQuiet(10*time.Second, nil, "losetup", "-d", dev)
		}
	}
	for _, m := range mountsUnder(work) {
		note("FUSE mount %s: fusermount3 -u", m.dir)
		if runQuiet(10*time.Second, nil, "fusermount3", "-u", m.dir) != nil {
			abortFUSE(work, note)
			runQuiet(10*time.Second, nil, "umount", "-l", m.dir)
		}
	}

	// The other processes: SIGTERM, then SIGKILL for those still there after 5 s.
	var pids []int
	for _, p := range markedProcs(work) {
		note("process %d (%s): SIGTERM", p.pid, p.cmdline)
		syscall.Kill(p.pid, syscall.SIGTERM)
		pids = append(pids, p.pid)
	}
	for _, p := range waitGone(pids, 5*time.Second) {
		note("process %d still there: SIGKILL", p)
		syscall.Kill(p, syscall.SIGKILL)
	}
	// A FUSE daemon that was killed leaves its mount behind.
	for _, m := range mountsUnder(work) {
		note("%s mount %s still there after its process ended: umount -l", m.fstype, m.dir)
		runQuiet(10*time.Second, nil, "umount", "-l", m.dir)
	}

	// State files of `atrest mount` for mount points under the work directory.
	states, _ := filepath.Glob(filepath.Join(mountstack.StateDir, "*.json"))
	for _, st := range states {
		var state mountstack.State
		b, err := os.ReadFile(st)
		if err == nil && json.Unmarshal(b, &state) == nil && under(state.Mountpoint, work) {
			note("state file %s: removed", st)
			os.Remove(st)
		}
	}

	if images != "" {
		if _, err := os.Stat(images); err == nil {
			if entries, _ := os.ReadDir(images); len(entries) > 0 {
				note("%d image(s) in %s: removed", len(entries), images)
			}
			os.RemoveAll(images)
		}
	}
	return found
}

type markedProc struct {
	pid           int
	comm, cmdline string
}

// markedProcs are the processes started by the run with this work directory.
func markedProcs(work string) []markedProc {
	marker := []byte(markerEnv + "=" + work + "\x00")
	var out []markedProc
	procs, _ := filepath.Glob("/proc/[0-9]*/environ")
	for _, e := range procs {
		b, err := os.ReadFile(e)
		if err != nil || !bytes.Contains(append(b, 0), marker) {
			continue
		}
		dir := filepath.Dir(e)
		pid, err := strconv.Atoi(filepath.Base(dir))
		if err != nil || pid == os.Getpid() {
			continue
		}
		comm, _ := os.ReadFile(filepath.Join(dir, "comm"))
		cmdline, _ := os.ReadFile(filepath.Join(dir, "cmdline"))
		out = append(out, markedProc{pid, strings.TrimSpace(string(comm)),
			strings.TrimSpace(strings.ReplaceAll(string(cmdline), "\x00", " "))})
	}
	return out
}

// waitGone waits up to d for the processes to end and returns those still there.
func waitGone(pids []int, d time.Duration) []int {
	for deadline := time.Now().Add(d); len(pids) > 0 && time.Now().Before(deadline); {
		pids = slices.DeleteFunc(pids, func(p int) bool { return syscall.Kill(p, 0) != nil })
		if len(pids) > 0 {
			time.Sleep(100 * time.Millisecond)
		}
	}
	return pids
}

// abortFUSE aborts the connections of the FUSE mounts under work
// (/sys/fs/fuse/connections/N/abort, N the mount's device minor): their requests fail
// at once instead of waiting for a daemon that cannot answer.
func abortFUSE(work string, note func(string, ...any)) {
	for _, m := range mountsUnder(work) {
		if !strings.HasPrefix(m.fstype, "fuse") || m.dev == "" {
			continue
		}
		_, minor, _ := strings.Cut(m.dev, ":")
		ctl := filepath.Join("/sys/fs/fuse/connections", minor, "abort")
		if err := os.WriteFile(ctl, []byte("1"), 0o200); err == nil {
			note("FUSE mount %s: connection aborted (%s)", m.dir, ctl)
		}
	}
}

type mountEntry struct{ dir, fstype, dev string }

// mountsUnder lists the mounts under dir from /proc/self/mountinfo, deepest first.
func mountsUnder(dir string) []mountEntry {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []mountEntry
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 10 {
			continue
		}
		mp := mountinfo.Unescape(f[4])
		sep := slices.Index(f, "-")
		if sep < 0 || sep+1 >= len(f) || !strings.HasPrefix(mp, dir+"/") {
			continue
		}
		out = append(out, mountEntry{mp, f[sep+1], f[2]})
	}
	slices.SortStableFunc(out, func(a, b mountEntry) int { return len(b.dir) - len(a.dir) })
	return out
}

// runQuiet runs a command for cleanup, with a timeout; its output goes nowhere
// unless it fails.
func runQuiet(timeout time.Duration, env []string, argv ...string) error {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(out.String()))
		}
		return nil
	case <-time.After(timeout):
		// A process in uninterruptible sleep (an unmount waiting for a flush) dies only
		// when the sleep ends: do not wait for it.
		cmd.Process.Kill()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
		}
		return fmt.Errorf("%s: timed out after %v", strings.Join(argv, " "), timeout)
	}
}
