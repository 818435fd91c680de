package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/atrest/atrest/node/nodetest"
)

// peerEnv, set, makes the test binary the child of TestNonRootRefused: it calls the
// socket named in it, as the uid it runs as, and prints what it got as JSON.
const peerEnv = "ATREST_API_TEST_PEER"

// peerReport is what the child prints.
type peerReport struct {
	UID        int    `json:"uid"`
	Status     int    `json:"status"`
	Body       string `json:"body"`
	DialErr    string `json:"dial_err"`
	Permission bool   `json:"permission"` // errors.Is(Dial's error, os.ErrPermission)
}

func TestMain(m *testing.M) {
	if sock := os.Getenv(peerEnv); sock != "" {
		os.Exit(peerChild(sock))
	}
	os.Exit(m.Run())
}

func peerChild(sock string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep := peerReport{UID: os.Getuid()}
	hc := rawClient(sock)
	resp, err := hc.Get("http://x/v1/encryption/status")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	rep.Status, rep.Body = resp.StatusCode, string(b)
	_, err = Dial(ctx, sock)
	if err != nil {
		rep.DialErr = err.Error()
	}
	rep.Permission = errors.Is(err, os.ErrPermission)
	json.NewEncoder(os.Stdout).Encode(rep)
	return 0
}

// TestNonRootRefused: a peer of another uid is refused with 403 and the code
// "permission" (the socket's mode loosened to 0666 for the test, so that the refusal
// seen is the server's SO_PEERCRED check, not the file mode), and nothing it asked is
// answered; root, on the same socket, is answered.
func TestNonRootRefused(t *testing.T) {
	if os.Getuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root to run a child as another uid")
		}
		t.Skip("needs root to run a child as another uid")
	}
	n, _ := nodetest.New(t)
	sock, c := serveAPI(t, n)
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	// The test binary's own directory is private to root: the child runs a copy.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(filepath.Dir(sock), "api.test")
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-test.run=^$")
	cmd.Dir = filepath.Dir(sock)
	cmd.Env = []string{peerEnv + "=" + sock, "PATH=/usr/bin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v: %s", err, stderr.String())
	}
	var rep peerReport
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("child's report %q: %v", out, err)
	}
	var e ErrorBody
	if err := json.Unmarshal([]byte(rep.Body), &e); rep.UID != 65534 || rep.Status != 403 || err != nil || e.Error.Code != "permission" || strings.Contains(rep.Body, "Encrypted") {
		t.Errorf("a peer of uid %d got %d %s", rep.UID, rep.Status, rep.Body)
	}
	if !rep.Permission || !strings.Contains(rep.DialErr, "root only") {
		t.Errorf("Dial as uid %d: %q (matches os.ErrPermission: %v)", rep.UID, rep.DialErr, rep.Permission)
	}
	if _, err := c.EncryptionStatus(ctx); err != nil {
		t.Errorf("root on the same socket: %v", err)
	}
}
