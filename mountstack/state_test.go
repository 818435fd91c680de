package mountstack

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/atrest/atrest/internal/proc"
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

func TestAlive(t *testing.T) {
	st, exited, err := proc.StartTime(os.Getpid())
	if err != nil || exited || st == 0 {
		t.Fatalf("StartTime(self) = %d, %v, %v", st, exited, err)
	}
	s := &State{PID: os.Getpid(), StartTime: st}
	if !s.Alive() {
		t.Error("this process is not alive")
	}
	s.StartTime++
	if s.Alive() {
		t.Error("a process with another start time (a reused pid) counts as alive")
	}
	if (&State{PID: 1 << 30}).Alive() {
		t.Error("a missing process counts as alive")
	}
}

// TestStateFormat locks the state file format (testdata/*.json, written by hand after
// what `atrest mount` wrote before this package existed): `atrest umount` of one
// version must read what `atrest mount` of another wrote, and the e2e tests and
// administrators read the file too.
func TestStateFormat(t *testing.T) {
	cases := map[string]State{
		"state.json": {Mountpoint: "/srv/vol1", FUSEDir: "/run/atrest/fuse/srv-vol1", File: "/run/atrest/fuse/srv-vol1/vol1",
			Loop: "/dev/loop3", PID: 4242, StartTime: 123456, NBD: "nbd+unix:///vol1?socket=%2Frun%2Fatrest%2Fnbd.sock", Export: "vol1"},
		// With the I/O timeout of the NBD client.
		"state-iotimeout.json": {Mountpoint: "/srv/vol1", FUSEDir: "/run/atrest/fuse/srv-vol1", File: "/run/atrest/fuse/srv-vol1/vol1",
			Loop: "/dev/loop3", PID: 4242, StartTime: 123456, NBD: "nbd+unix:///vol1?socket=%2Frun%2Fatrest%2Fnbd.sock", Export: "vol1",
			IOTimeout: "3m0s"},
		// As a mount process left it when it lost what its NBD client held (State.Lost).
		"state-lost.json": {Mountpoint: "/srv/vol1", FUSEDir: "/run/atrest/fuse/srv-vol1", File: "/run/atrest/fuse/srv-vol1/vol1",
			Loop: "/dev/loop3", PID: 4242, StartTime: 123456, NBD: "nbd+unix:///vol1?socket=%2Frun%2Fatrest%2Fnbd.sock", Export: "vol1",
			IOTimeout: "3m0s", Lost: true, LostWrites: 3, LostBytes: 12288},
		// With the volume identity of atrest serve.
		"state-volume.json": {Mountpoint: "/srv/vol1", FUSEDir: "/run/atrest/fuse/srv-vol1", File: "/run/atrest/fuse/srv-vol1/vol1",
			Loop: "/dev/loop3", PID: 4242, StartTime: 123456, NBD: "nbd+unix:///vol1?socket=%2Frun%2Fatrest%2Fnbd.sock", Export: "vol1",
			VolumeID: "5e0d2a8c-8f55-4b8e-a6a4-0c9d1a2b3c4d"},
		// Recorded before the loop device is attached: no "loop".
		"state-unattached.json": {Mountpoint: "/mnt/my vol", FUSEDir: "/tmp/fuse", File: "/tmp/fuse/volume",
			PID: 7, StartTime: 99, NBD: "nbd://127.0.0.1:10809/"},
	}
	for name, s := range cases {
		golden, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			t.Fatal(err)
		}
		got, err := marshalState(&s)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(golden) {
			t.Errorf("%s: marshalState =\n%s\nwant\n%s", name, got, golden)
		}
		var back State
		if err := json.Unmarshal(golden, &back); err != nil || back != s {
			t.Errorf("%s: parses as %+v, %v; want %+v", name, back, err, s)
		}
	}
}
