package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/testutil"
)

// uri returns the NBD URI of an export of ts.
func (ts *testServer) uri(export string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, ts.sock)
}

func run(t *testing.T, timeout time.Duration, name string, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("%s %v: timed out", name, args)
	}
	return stdout.String(), stderr.String(), err
}

// threeExports: a writable default export with trims, a read-only one, and one
// without trims (its device cannot trim).
func threeExports() []Export {
	return []Export{
		{Name: "", Description: "default export", Device: blockdev.NewMem(16 << 20)},
		{Name: "ro", Description: "read only", Device: blockdev.NewMem(1 << 20), ReadOnly: true},
		{Name: "notrim", Device: plainDev{blockdev.NewMem(4 << 20)}},
	}
}

func TestNbdinfoJSON(t *testing.T) {
	nbdinfo := testutil.Tool(t, "nbdinfo")
	checkLeaks(t)
	ts := startServer(t, ServerConfig{}, threeExports()...)
	out, errOut, err := run(t, 30*time.Second, nbdinfo, "--json", ts.uri(""))
	if err != nil {
		t.Fatalf("nbdinfo: %v\n%s", err, errOut)
	}
	var info struct {
		Protocol   string           `json:"protocol"`
		TLS        bool             `json:"TLS"`
		Structured bool             `json:"structured"`
		Exports    []map[string]any `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if info.Protocol != "newstyle-fixed" || info.TLS || !info.Structured || len(info.Exports) != 1 {
		t.Fatalf("unexpected: %s", out)
	}
	want := map[string]any{
		"export-name": "", "description": "default export", "export-size": 16777216.0,
		"is_read_only": false, "is_rotational": false, "can_flush": true, "can_fua": true,
		"can_trim": true, "can_zero": true, "can_fast_zero": true, "can_multi_conn": true,
		"can_cache": true, "can_df": true, "block_size_minimum": 1.0, "block_size_preferred": 512.0,
		"block_size_maximum": 33554432.0,
	}
	for k, v := range want {
		if got := info.Exports[0][k]; got != v {
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
}

func TestNbdinfoCan(t *testing.T) {
	nbdinfo := testutil.Tool(t, "nbdinfo")
	checkLeaks(t)
	ts := startServer(t, ServerConfig{}, threeExports()...)
	cases := []struct {
		export, feature string
		want            bool
	}{
		{"", "flush", true}, {"", "fua", true}, {"", "trim", true}, {"", "zero", true},
		{"", "fast-zero", true}, {"", "multi-conn", true}, {"", "cache", true}, {"", "df", true},
		{"", "structured-reply", true}, {"", "read", true}, {"", "write", true},
		{"ro", "write", false}, {"ro", "trim", false}, {"ro", "zero", false}, {"ro", "fua", false},
		{"ro", "read", true}, {"ro", "flush", true}, {"ro", "multi-conn", true},
		{"notrim", "trim", false}, {"notrim", "zero", true}, {"notrim", "fua", true},
	}
	for _, c := range cases {
		_, errOut, err := run(t, 30*time.Second, nbdinfo, "--can", c.feature, ts.uri(c.export))
		got := err == nil
		if ee, ok := err.(*exec.ExitError); err != nil && (!ok || ee.ExitCode() != 2) {
			t.Fatalf("nbdinfo --can %s on %q: %v\n%s", c.feature, c.export, err, errOut)
		}
		if got != c.want {
			t.Errorf("nbdinfo --can %s on export %q: %v, want %v", c.feature, c.export, got, c.want)
		}
	}
}

func TestNbdinfoList(t *testing.T) {
	nbdinfo := testutil.Tool(t, "nbdinfo")
	checkLeaks(t)
	ts := startServer(t, ServerConfig{}, threeExports()...)
	out, errOut, err := run(t, 30*time.Second, nbdinfo, "--list", "--json", ts.uri(""))
	if err != nil {
		t.Fatalf("nbdinfo --list: %v\n%s", err, errOut)
	}
	var info struct {
		Exports []struct {
			Name        string `json:"export-name"`
			Description string `json:"description"`
			Size        int64  `json:"export-size"`
			ReadOnly    bool   `json:"is_read_only"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var got []string
	for _, e := range info.Exports {
		got = append(got, fmt.Sprintf("%q %q %d %v", e.Name, e.Description, e.Size, e.ReadOnly))
	}
	want := []string{`"" "default export" 16777216 false`, `"notrim" "" 4194304 false`, `"ro" "read only" 1048576 true`}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("exports:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestQemuIO runs a qemu-io script with realistic cache settings (-t none) and traces
// what qemu really sends, since qemu quietly works around missing features.
func TestQemuIO(t *testing.T) {
	qemuIO := testutil.Tool(t, "qemu-io")
	checkLeaks(t)
	mem := blockdev.NewMem(16 << 20)
	ts := startServer(t, ServerConfig{}, Export{Device: mem})
	script := []string{
		"write -P 0xab 0 64k",
		"write -f -P 0xcd 64k 4k", // FUA
		"flush",
		"write -P 0x55 128k 64k",
		"write -z 128k 64k", // WRITE_ZEROES
		"discard 256k 64k",  // TRIM
		"aio_write -P 0x11 1M 64k",
		"aio_write -P 0x22 2M 1M",
		"aio_write -P 0x33 3M 3M",
		"aio_flush",
		"read -P 0xab 0 64k",
		"read -P 0xcd 64k 4k",
		"read -P 0 128k 64k",
		"read -P 0x11 1M 64k",
		"read -P 0x22 2M 1M",
		"read -P 0x33 3M 3M",
	}
	args := []string{"-f", "raw", "-t", "none", "--trace", "nbd_send_request"}
	for _, c := range script {
		args = append(args, "-c", c)
	}
	args = append(args, ts.uri(""))
	out, trace, err := run(t, 60*time.Second, qemuIO, args...)
	if err != nil || strings.Contains(out, "failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io: %v\n%s\n%s", err, out, trace)
	}
	sent := map[string]bool{}
	re := regexp.MustCompile(`\.flags = (0x[0-9a-f]+), \.type = \d+ \(([a-z ]+)\)`)
	for _, m := range re.FindAllStringSubmatch(trace, -1) {
		sent[m[2]+" "+m[1]] = true
	}
	for _, want := range []string{"write 0x0", "write 0x1", "flush 0x0", "write zeroes 0x2", "trim 0x0", "read 0x0", "disconnect 0x0"} {
		if !sent[want] {
			t.Errorf("qemu-io did not send %q; trace:\n%s", want, trace)
		}
	}
	// The device itself has the data (an independent look, not through the server).
	got := make([]byte, 4096)
	mem.ReadAt(got, 64<<10)
	if !bytes.Equal(got, bytes.Repeat([]byte{0xcd}, 4096)) {
		t.Error("FUA write not on the device")
	}
}

func TestNbdcopyBothWays(t *testing.T) {
	nbdcopy := testutil.Tool(t, "nbdcopy")
	checkLeaks(t)
	const size = 32 << 20
	mem := blockdev.NewMem(size)
	ts := startServer(t, ServerConfig{}, Export{Device: mem})
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	data := pattern(size, 9)
	copy(data[5<<20:], make([]byte, 3<<20)) // a run of zeroes, which nbdcopy sends as zeroes
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	before := ts.Stats().Accepted
	if _, errOut, err := run(t, 60*time.Second, nbdcopy, "--connections=4", "--threads=4", "--requests=16", "--flush", src, ts.uri("")); err != nil {
		t.Fatalf("nbdcopy to the server: %v\n%s", err, errOut)
	}
	// nbdcopy opens several connections (at most --threads) only where CAN_MULTI_CONN is
	// advertised.
	if n := ts.Stats().Accepted - before; n < 4 {
		t.Fatalf("nbdcopy used %d connections, want at least 4", n)
	}
	got := make([]byte, size)
	mem.ReadAt(got, 0)
	if !bytes.Equal(got, data) {
		t.Fatal("device differs from the source after nbdcopy")
	}
	dst := filepath.Join(dir, "dst.img")
	if _, errOut, err := run(t, 60*time.Second, nbdcopy, "--connections=4", ts.uri(""), dst); err != nil {
		t.Fatalf("nbdcopy from the server: %v\n%s", err, errOut)
	}
	back, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, data) {
		t.Fatal("copy from the server differs")
	}
}

// fioJSON strips fio's "fio: connected to NBD server" line and parses the rest.
func fioJSON(t *testing.T, out string) map[string]any {
	t.Helper()
	if i := strings.Index(out, "{"); i >= 0 {
		out = out[i:]
	}
	var v map[string]any
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	return v
}

func TestFioVerify(t *testing.T) {
	fio := testutil.Tool(t, "fio")
	checkLeaks(t)
	ts := startServer(t, ServerConfig{}, Export{Device: blockdev.NewMem(64 << 20)})
	out, errOut, err := run(t, 120*time.Second, fio, "--name=verify", "--ioengine=nbd", "--uri="+ts.uri(""),
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=64M", "--verify=crc32c",
		"--verify_fatal=1", "--verify_state_save=0", "--output-format=json")
	if err != nil {
		t.Fatalf("fio: %v\n%s\n%s", err, out, errOut)
	}
	v := fioJSON(t, out)
	job := v["jobs"].([]any)[0].(map[string]any)
	if e := job["error"].(float64); e != 0 {
		t.Fatalf("fio job error %v", e)
	}
	w := job["write"].(map[string]any)["io_bytes"].(float64)
	r := job["read"].(map[string]any)["io_bytes"].(float64)
	if w != 64<<20 || r != 64<<20 {
		t.Fatalf("fio wrote %v and verified %v bytes, want 64 MiB each", w, r)
	}
}
