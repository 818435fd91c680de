package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/bench/report"
)

// machine describes this machine for the report.
func machine(ctx context.Context) report.Machine {
	m := report.Machine{Cores: runtime.NumCPU(), Go: runtime.Version(), Tools: map[string]string{}}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
				kb, _ := strconv.ParseFloat(f[1], 64)
				m.MemoryGiB = kb / (1 << 20)
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	for name, argv := range map[string][]string{
		"fio":        {"fio", "--version"},
		"nbdkit":     {"nbdkit", "--version"},
		"nbdfuse":    {"nbdfuse", "--version"},
		"openssl":    {"openssl", "version"},
		"cryptsetup": {"cryptsetup", "--version"},
	} {
		out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).Output()
		if err != nil {
			continue
		}
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		// "nbdkit 1.32.5" → "1.32.5"; "OpenSSL 3.0.x 1 Jan 2024 (...)" → "3.0.x".
		f := strings.Fields(line)
		switch {
		case len(f) >= 2 && strings.EqualFold(f[0], name):
			line = f[1]
		case len(f) >= 1 && name == "fio":
			line = strings.TrimPrefix(f[0], "fio-")
		}
		m.Tools[name] = line
	}
	return m
}

// gitState returns the commit checked out in repo and whether the tree differs from
// it (tracked or untracked files, outside docs/bench, which the benchmark writes).
func gitState(ctx context.Context, repo string) (commit string, dirty bool, err error) {
	out, err := exec.CommandContext(ctx, "git", "-C", repo, "rev-parse", "HEAD").Output()
	if err != nil {
		return "", false, err
	}
	commit = strings.TrimSpace(string(out))
	out, err = exec.CommandContext(ctx, "git", "-C", repo, "status", "--porcelain", "--", ".", ":(exclude)docs/bench", ":(exclude)README.md").Output()
	if err != nil {
		return "", false, err
	}
	if len(strings.TrimSpace(string(out))) > 0 {
		return commit, true, nil
	}
	// README.md counts too, except for the section the benchmark writes.
	head, err := exec.CommandContext(ctx, "git", "-C", repo, "show", "HEAD:README.md").Output()
	if err != nil {
		return "", false, err
	}
	now, err := os.ReadFile(filepath.Join(repo, "README.md"))
	if err != nil {
		return "", false, err
	}
	return commit, withoutSection(string(head)) != withoutSection(string(now)), nil
}

// fsType names the file system of dir (tmpfs, or its magic number).
func fsType(dir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "unknown"
	}
	switch st.Type {
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	}
	return "0x" + strconv.FormatInt(st.Type, 16)
}

// freeBytes is the space available in dir.
func freeBytes(dir string) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return -1
	}
	return int64(st.Bavail) * st.Bsize
}
