package systemd

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/atrest/atrest/internal/testutil"
)

var units = []string{"atrest.service", "atrest-mount@.service"}

// install runs scripts/install-units.sh into a fresh root, with the atrest binary in a
// bin directory of its own, and returns the directory of the installed units, the
// binary's path and the script's output.
func install(t *testing.T) (unitDir, bin, out string) {
	t.Helper()
	root := t.TempDir()
	bindir := filepath.Join(root, "opt", "atrest", "bin")
	if err := os.MkdirAll(bindir, 0o755); err != nil {
		t.Fatal(err)
	}
	// systemd-analyze verify checks that ExecStart= names an executable; it never runs
	// it, so a stand-in does.
	bin = filepath.Join(bindir, "atrest")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	out = runScript(t, "--root", root, "--bindir", bindir)
	return filepath.Join(root, "etc", "systemd", "system"), bin, out
}

func runScript(t *testing.T, args ...string) string {
	t.Helper()
	script, err := filepath.Abs("../scripts/install-units.sh")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(testutil.Tool(t, "sh"), append([]string{script}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("install-units.sh %v: %v\n%s", args, err, out)
	}
	return string(out)
}

func TestVerify(t *testing.T) {
	analyze := testutil.Tool(t, "systemd-analyze")
	dir, bin, _ := install(t)
	files := []string{
		filepath.Join(dir, "atrest.service"),
		filepath.Join(dir, "atrest-mount@.service"),
	}
	// An instance too, so that the specifiers (%f, %i) are expanded for a real path.
	inst := filepath.Join(dir, "atrest-mount@srv-vol1.service")
	data, err := os.ReadFile(files[1])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(inst, data, 0o644); err != nil {
		t.Fatal(err)
	}
	files = append(files, inst)
	for _, f := range files {
		text, _ := os.ReadFile(f)
		if !strings.Contains(string(text), "ExecStart="+bin+" ") {
			t.Fatalf("%s: ExecStart does not name the installed binary %s: the check below would test nothing", f, bin)
		}
	}
	// verify exits 0 on unknown keys and bad values (it ignores them with a warning),
	// so any output is a failure.
	out, err := exec.Command(analyze, append([]string{"verify"}, files...)...).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestVerifyCatchesMistakes shows that the check above fails on a broken unit.
func TestVerifyCatchesMistakes(t *testing.T) {
	analyze := testutil.Tool(t, "systemd-analyze")
	dir, _, _ := install(t)
	p := filepath.Join(dir, "atrest.service")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	broken := strings.Replace(string(data), "ProtectSystem=strict", "ProtectSystem=strickt", 1)
	if err := os.WriteFile(p, []byte(broken), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _ := exec.Command(analyze, "verify", p).CombinedOutput()
	if !strings.Contains(string(out), "strickt") {
		t.Errorf("systemd-analyze verify said nothing about a bad value: %q", out)
	}
}

func TestInstallIdempotent(t *testing.T) {
	root := t.TempDir()
	first := runScript(t, "--root", root)
	second := runScript(t, "--root", root)
	dir := filepath.Join(root, "etc", "systemd", "system")
	for _, u := range units {
		if !strings.Contains(first, "installed: "+filepath.Join(dir, u)) {
			t.Errorf("first run did not install %s:\n%s", u, first)
		}
		if !strings.Contains(second, "unchanged: "+filepath.Join(dir, u)) {
			t.Errorf("second run did not leave %s alone:\n%s", u, second)
		}
		fi, err := os.Stat(filepath.Join(dir, u))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != 0o644 {
			t.Errorf("%s installed with mode %v, want 0644", u, fi.Mode())
		}
		want, _ := os.ReadFile(u)
		got, _ := os.ReadFile(filepath.Join(dir, u))
		if string(got) != string(want) {
			t.Errorf("%s installed with the default bindir differs from the shipped unit", u)
		}
	}
	if strings.Contains(second, "reloaded") || strings.Contains(first, "reloaded") {
		t.Error("install into a --root reloaded systemd")
	}
}

// settings parses the Key=Value lines of a unit file, by section.
func settings(t *testing.T, path string) map[string][]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "["):
			section = strings.Trim(line, "[]")
		default:
			k, v, _ := strings.Cut(line, "=")
			out[section+"."+k] = append(out[section+"."+k], v)
		}
	}
	return out
}

func TestDaemonUnit(t *testing.T) {
	s := settings(t, "atrest.service")
	for k, want := range map[string]string{
		"Service.Type":                     "notify",
		"Service.Restart":                  "on-failure",
		"Service.StateDirectory":           "atrest",
		"Service.StateDirectoryMode":       "0700",
		"Service.RuntimeDirectory":         "atrest",
		"Service.RuntimeDirectoryMode":     "0700",
		"Service.ProtectSystem":            "strict",
		"Service.ProtectHome":              "yes",
		"Service.PrivateTmp":               "yes",
		"Service.NoNewPrivileges":          "yes",
		"Service.PrivateDevices":           "no",
		"Service.DevicePolicy":             "closed",
		"Service.RuntimeDirectoryPreserve": "yes",
	} {
		if !slices.Contains(s[k], want) {
			t.Errorf("atrest.service: %s = %v, want %s", k, s[k], want)
		}
	}
	if !slices.Contains(s["Service.DeviceAllow"], "block-* rw") {
		t.Errorf("atrest.service: DeviceAllow = %v, want block-* rw (the drives)", s["Service.DeviceAllow"])
	}
}

func TestMountUnit(t *testing.T) {
	s := settings(t, "atrest-mount@.service")
	for k, want := range map[string]string{
		"Unit.Wants":       "atrest.service",
		"Unit.After":       "atrest.service",
		"Service.Type":     "notify",
		"Service.ExecStop": "/usr/local/bin/atrest umount %f",
	} {
		if !slices.Contains(s[k], want) {
			t.Errorf("atrest-mount@.service: %s = %v, want %s", k, s[k], want)
		}
	}
	// Requires= would stop or restart every mount with the daemon.
	if v, ok := s["Unit.Requires"]; ok {
		t.Errorf("atrest-mount@.service: Requires=%v; a daemon restart must not unmount the volumes", v)
	}
	if !slices.ContainsFunc(s["Service.ExecStart"], func(v string) bool {
		return strings.HasPrefix(v, "/usr/local/bin/atrest mount ") && strings.HasSuffix(v, " %f")
	}) {
		t.Errorf("atrest-mount@.service: ExecStart = %v, want atrest mount ... %%f", s["Service.ExecStart"])
	}
	// The mounts it makes must land in the host's mount namespace: any of these would
	// give the service a namespace of its own, and the volume would be invisible.
	for _, k := range []string{"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
		"ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
		"ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
		"ProtectProc", "MountFlags", "RootDirectory", "RootImage", "PrivateUsers", "PrivateNetwork"} {
		if v, ok := s["Service."+k]; ok {
			t.Errorf("atrest-mount@.service sets %s=%v, which gives it a private mount namespace", k, v)
		}
	}
}

// TestExposure reports systemd's own security rating of the units, offline.
func TestExposure(t *testing.T) {
	analyze := testutil.Tool(t, "systemd-analyze")
	dir, _, _ := install(t)
	re := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+) (\S+)`)
	for _, u := range []string{"atrest.service", "atrest-mount@.service"} {
		out, err := exec.Command(analyze, "security", "--offline=true", filepath.Join(dir, u)).CombinedOutput()
		m := re.FindSubmatch(out)
		if err != nil || m == nil {
			t.Fatalf("systemd-analyze security %s: %v\n%s", u, err, out)
		}
		t.Logf("%s: exposure %s %s", u, m[1], m[2])
		if u == "atrest.service" && string(m[2]) != "OK" && string(m[2]) != "SAFE" {
			t.Errorf("atrest.service: exposure %s %s, want OK or SAFE", m[1], m[2])
		}
	}
}
