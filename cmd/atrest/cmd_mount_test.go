package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestEscapePath: state files are named as systemd-escape --path names the instances
// of atrest-mount@ (checked against the real program where it is installed).
func TestEscapePath(t *testing.T) {
	cases := map[string]string{
		"/":                            "-",
		"/srv/vol1":                    "srv-vol1",
		"/srv//vol1/":                  "srv-vol1",
		"/mnt/my vol":                  `mnt-my\x20vol`,
		"/mnt/a-b":                     `mnt-a\x2db`,
		"/.hidden/x":                   `\x2ehidden-x`,
		"/data/ü":                      `data-\xc3\xbc`,
		"/a:b_c.d":                     "a:b_c.d",
		"/" + strings.Repeat("x", 300): "sha256-",
	}
	escape, _ := exec.LookPath("systemd-escape")
	for in, want := range cases {
		got := escapePath(in)
		if strings.HasSuffix(want, "-") && want != "-" {
			if !strings.HasPrefix(got, want) || len(got) > 200 {
				t.Errorf("escapePath(long) = %q, want a short hash", got)
			}
			continue
		}
		if got != want {
			t.Errorf("escapePath(%q) = %q, want %q", in, got, want)
		}
		if escape != "" {
			out, err := exec.Command(escape, "--path", in).Output()
			if err == nil && strings.TrimSpace(string(out)) != got {
				t.Errorf("escapePath(%q) = %q, systemd-escape --path says %q", in, got, strings.TrimSpace(string(out)))
			}
		}
	}
}

func TestProcStartTime(t *testing.T) {
	st, exited, err := procStartTime(os.Getpid())
	if err != nil || exited || st == 0 {
		t.Fatalf("procStartTime(self) = %d, %v, %v", st, exited, err)
	}
	s := &mountState{PID: os.Getpid(), StartTime: st}
	if !s.alive() {
		t.Error("this process is not alive")
	}
	s.StartTime++
	if s.alive() {
		t.Error("a process with another start time (a reused pid) counts as alive")
	}
	if (&mountState{PID: 1 << 30}).alive() {
		t.Error("a missing process counts as alive")
	}
}
