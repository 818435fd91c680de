package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/testutil"
)

// curlJSON asks the control API at sock with curl, as an administrator would, and
// decodes the JSON answer into v; it returns the HTTP status.
func curlJSON(t *testing.T, sock, method, path string, v any) int {
	t.Helper()
	r := runProg(t, "", 60*time.Second, nil, testutil.Tool(t, "curl"), "-sS", "--unix-socket", sock, "-X", method,
		"-o", "/dev/stdout", "-w", "\n%{http_code}", "http://atrest"+path)
	if r.code != 0 {
		t.Fatalf("curl %s %s: exit %d: %s", method, path, r.code, r.stderr)
	}
	// The body, then the status on a line of its own (-w).
	i := strings.LastIndex(r.stdout, "\n")
	body, code := r.stdout[:max(i, 0)], r.stdout[i+1:]
	if v != nil {
		if err := json.Unmarshal([]byte(body), v); err != nil {
			t.Fatalf("curl %s %s: %v: %q", method, path, err, body)
		}
	}
	var status int
	if _, err := fmt.Sscan(code, &status); err != nil {
		t.Fatalf("curl %s %s: status %q", method, path, code)
	}
	return status
}

// TestServeTakesNewDrive: issue 10's check. With atrest serve running, a drive
// formatted by the CLI goes through the daemon and its volume is exported at once
// (nbdinfo --list); the control API answers the product's encryption status (curl);
// a rotation through the daemon prints "Key rotation complete" and the status shows its
// time; encryption-status says the same things with and without the daemon.
func TestServeTakesNewDrive(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	d := c.serve(c.format("first", "48M"))

	img := c.dir + "/new.img"
	out := c.must("drive", "format", "--create", "48M", "--volume", "new", img)
	if !strings.Contains(out, `Served by the daemon as NBD export "new"`) {
		t.Fatalf("drive format while serving: %s", out)
	}
	list := runProg(t, "", 60*time.Second, nil, testutil.Tool(t, "nbdinfo"), "--list", "nbd+unix:///?socket="+d.sock)
	if list.code != 0 || !strings.Contains(list.stdout, "export=") || !strings.Contains(list.stdout, "new") {
		t.Fatalf("nbdinfo --list: exit %d\n%s%s", list.code, list.stdout, list.stderr)
	}
	cl := d.dial("new")
	if _, err := cl.WriteAt([]byte("the new volume takes writes"), 0); err != nil {
		t.Fatalf("write to the new export: %v", err)
	}
	if err := cl.Flush(); err != nil {
		t.Fatal(err)
	}
	cl.Close()

	var es struct {
		Status  string     `json:"status"`
		Type    string     `json:"type"`
		LastRot *time.Time `json:"last_key_rotation_time"`
	}
	if code := curlJSON(t, c.control(), "GET", "/v1/encryption/status", &es); code != 200 || es.Status != "Encrypted" || es.Type != "Local" || es.LastRot != nil {
		t.Fatalf("GET /v1/encryption/status: %d %+v", code, es)
	}

	rot := c.must("rotate-encryption-keys")
	if !strings.HasSuffix(rot, "Key rotation complete\n") {
		t.Fatalf("rotate-encryption-keys through the daemon: %s", rot)
	}
	if code := curlJSON(t, c.control(), "GET", "/v1/encryption/status", &es); code != 200 || es.LastRot == nil || time.Since(*es.LastRot) > time.Minute {
		t.Fatalf("GET /v1/encryption/status after the rotation: %d %+v", code, es)
	}
	if !strings.Contains(d.stderr.String(), "key rotation complete") {
		t.Errorf("the daemon's log does not tell the rotation:\n%s", d.stderr.String())
	}

	type status struct {
		Serving bool `json:"serving"`
		Volumes []struct {
			Name    string   `json:"name"`
			State   string   `json:"state"`
			Exports []string `json:"exports"`
		} `json:"volumes"`
		Drives []struct {
			UUID  string `json:"uuid"`
			State string `json:"state"`
			KeyID string `json:"key_id"`
		} `json:"drives"`
		MasterKeyID string `json:"master_key_id"`
	}
	var served status
	if err := json.Unmarshal([]byte(c.must("encryption-status", "--json")), &served); err != nil {
		t.Fatal(err)
	}
	if !served.Serving || len(served.Volumes) != 2 || len(served.Volumes[1].Exports) != 1 || served.Volumes[1].Exports[0] != "new" {
		t.Fatalf("status through the daemon: %+v", served)
	}
	text := c.must("encryption-status")
	d.stop()
	var offline status
	if err := json.Unmarshal([]byte(c.must("encryption-status", "--json")), &offline); err != nil {
		t.Fatal(err)
	}
	if offline.Serving || len(offline.Volumes) != 2 || len(offline.Volumes[0].Exports) != 0 {
		t.Fatalf("status without the daemon: %+v", offline)
	}
	for i := range served.Drives {
		s, o := served.Drives[i], offline.Drives[i]
		if s != o || s.KeyID != served.MasterKeyID || s.State != "present" {
			t.Errorf("drive %d: %+v through the daemon, %+v without it", i, s, o)
		}
	}
	offText := c.must("encryption-status")
	// The text is the same but for what only the daemon knows.
	strip := func(s string) string {
		var keep []string
		for _, l := range strings.Split(s, "\n") {
			if !strings.HasPrefix(l, "Served:") && !strings.HasPrefix(l, "Master Key Created:") && !strings.HasPrefix(l, "  VOLUME") && !strings.Contains(l, " single ") {
				keep = append(keep, l)
			}
		}
		return strings.Join(keep, "\n")
	}
	if strip(text) != strip(offText) {
		t.Errorf("encryption-status differs with and without the daemon:\n%s\n---\n%s", text, offText)
	}
}

// TestControlSocketOfAnotherKeystore: the control socket belongs to one daemon. A
// second daemon (another keystore, its own NBD socket) asked to answer on the same
// control socket is refused as busy and leaves nothing behind; the commands of that
// other keystore, pointed at the first daemon's control socket, work on their own
// keystore and never reach the daemon, which serves on unchanged; a control path where
// no control API answers is said in a warning. The daemon's log has one readiness line.
func TestControlSocketOfAnotherKeystore(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	d := c.serve(c.format("first", "48M"))
	other := newClusterIn(t, c.dir, "keystore-other") // c.dir: the same ATREST_CONTROL
	img := other.format("theirs", "48M")
	other.refused(exitcodes.Busy, "in use by a running daemon", []string{img},
		spawnOpts{sock: filepath.Join(c.dir, "other.sock"), args: []string{img}, env: []string{"ATREST_CONTROL=" + c.control()}})

	out := other.must("drive", "format", "--create", "48M", "--volume", "second", filepath.Join(c.dir, "second.img"))
	if strings.Contains(out, "Served by the daemon") {
		t.Fatalf("a drive of another keystore was given to the daemon: %s", out)
	}
	var st struct {
		Serving bool `json:"serving"`
		Volumes []struct {
			Name string `json:"name"`
		} `json:"volumes"`
	}
	if err := json.Unmarshal([]byte(other.must("encryption-status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Serving || len(st.Volumes) != 2 {
		t.Fatalf("the other keystore's status: %+v", st)
	}
	list := runProg(t, "", 60*time.Second, nil, testutil.Tool(t, "nbdinfo"), "--list", "nbd+unix:///?socket="+d.sock)
	if list.code != 0 || strings.Contains(list.stdout, "second") || strings.Contains(list.stdout, "theirs") {
		t.Fatalf("nbdinfo --list of the daemon: exit %d\n%s%s", list.code, list.stdout, list.stderr)
	}
	// A control path that is no control API (here the daemon's NBD socket): the command
	// says so and works on the keystore.
	r := runProg(t, c.dir, 60*time.Second, cleanEnv("ATREST_KEYSTORE="+c.ks, "ATREST_CONTROL="+d.sock), atrestBin, "encryption-status")
	if r.code != 0 || !strings.Contains(r.stderr, "warning: the daemon's control socket "+d.sock) || !strings.Contains(r.stdout, "read from the keystore") {
		t.Errorf("encryption-status with ATREST_CONTROL at the NBD socket: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	ready := 0
	for _, l := range strings.Split(d.stderr.String(), "\n") {
		if strings.HasPrefix(l, "atrest serve: serving") {
			ready++
		}
	}
	if ready != 1 {
		t.Errorf("%d lines of the daemon's log read as its readiness line 'atrest serve: serving ...', want 1:\n%s", ready, d.stderr.String())
	}
}
