// Package testutil holds what the integration tests of several packages share: finding
// the external programs they talk to, and refusing to skip silently in CI.
package testutil

import (
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run in CI (CI=true), where a missing tool or missing
// privilege is a failure instead of a skip.
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable skips the test with the reason, or fails it in CI.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("CI=true and a requirement is missing: "+format, args...)
	}
	t.Skipf(format, args...)
}

// Tool returns the path of the named program, or skips the test (fails it in CI) when
// the program is not installed. The README's test command installs every tool used.
func Tool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Unavailable(t, "%s is not installed (scripts/test.sh installs it)", name)
	}
	return p
}

// Root skips the test (fails it in CI) unless it runs as root.
func Root(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "the test needs root")
	}
}

// Python3 returns the Debian system python3, which has python3-cryptography from apt,
// rather than whatever python3 comes first in PATH.
func Python3(t testing.TB) string {
	t.Helper()
	const p = "/usr/bin/python3"
	if exec.Command(p, "-c", "import cryptography").Run() == nil {
		return p
	}
	Unavailable(t, "/usr/bin/python3 with python3-cryptography is not installed (apt install python3-cryptography)")
	return ""
}

// LoopAndFUSE skips the test (fails it in CI) unless it runs as root with loop devices,
// FUSE and the named programs, as the tests that mount volumes need.
func LoopAndFUSE(t testing.TB, tools ...string) {
	t.Helper()
	Root(t)
	for _, p := range []string{"/dev/loop-control", "/dev/fuse"} {
		if _, err := os.Stat(p); err != nil {
			Unavailable(t, "%s is missing: %v", p, err)
		}
	}
	for _, tool := range tools {
		Tool(t, tool)
	}
}
