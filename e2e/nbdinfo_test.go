package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/testutil"
)

// nbdinfoExport is one export of `nbdinfo --json`.
type nbdinfoExport struct {
	Name           string `json:"export-name"`
	Description    string `json:"description"`
	Size           int64  `json:"export-size"`
	ReadOnly       bool   `json:"is_read_only"`
	Rotational     bool   `json:"is_rotational"`
	CanCache       bool   `json:"can_cache"`
	CanDF          bool   `json:"can_df"`
	CanFastZero    bool   `json:"can_fast_zero"`
	CanFlush       bool   `json:"can_flush"`
	CanFUA         bool   `json:"can_fua"`
	CanMultiConn   bool   `json:"can_multi_conn"`
	CanTrim        bool   `json:"can_trim"`
	CanZero        bool   `json:"can_zero"`
	BlockMin       int64  `json:"block_size_minimum"`
	BlockPreferred int64  `json:"block_size_preferred"`
	BlockMax       int64  `json:"block_size_maximum"`
}

type nbdinfoJSON struct {
	Protocol   string          `json:"protocol"`
	TLS        bool            `json:"TLS"`
	Structured bool            `json:"structured"`
	Exports    []nbdinfoExport `json:"exports"`
}

func nbdinfo(t *testing.T, args ...string) nbdinfoJSON {
	t.Helper()
	out := mustProg(t, "", 30*time.Second, testutil.Tool(t, "nbdinfo"), append([]string{"--json"}, args...)...)
	var v nbdinfoJSON
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	return v
}

// nbdinfoCan runs `nbdinfo --can FEATURE` (or --is) and returns its answer: exit 0 is
// true, 2 false, anything else an error.
func nbdinfoCan(t *testing.T, how, feature, uri string) bool {
	t.Helper()
	r := runProg(t, "", 30*time.Second, nil, testutil.Tool(t, "nbdinfo"), how, feature, uri)
	if r.code != 0 && r.code != 2 {
		t.Fatalf("nbdinfo %s %s %s: exit %d\n%s", how, feature, uri, r.code, r.stderr)
	}
	return r.code == 0
}

// TestServeNbdinfo checks with libnbd's nbdinfo what `atrest serve` advertises for two
// volumes, one formatted with --allow-discards (4096-byte sectors) and one without
// (512-byte sectors), on a unix socket and a TCP listener at once.
func TestServeNbdinfo(t *testing.T) {
	t.Parallel()
	testutil.Tool(t, "nbdinfo")
	c := newCluster(t)
	c.format("disc", "64M", "--allow-discards")
	c.format("plain", "32M", "--sector-size", "512")
	d := c.serve("--listen", "tcp:127.0.0.1:0", "disc.img", "plain.img")

	if fi, err := os.Stat(d.sock); err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %s: %v %v, want a socket of mode 0600", d.sock, fi.Mode(), err)
	}
	m := regexp.MustCompile(`serving 2 export\(s\) \["disc" "plain"\] on unix:\S+, tcp:(127\.0\.0\.1:\d+)\n`).FindStringSubmatch(d.stderr.String())
	if m == nil {
		t.Fatalf("no serving line naming both exports and both listeners:\n%s", d.stderr.String())
	}
	tcp := m[1]

	for _, v := range []struct {
		name   string
		size   int64
		sector int64
		trim   bool
	}{
		{name: "disc", size: 48 << 20, sector: 4096, trim: true},
		{name: "plain", size: 16 << 20, sector: 512, trim: false},
	} {
		info := nbdinfo(t, d.uri(v.name))
		if info.Protocol != "newstyle-fixed" || info.TLS || !info.Structured || len(info.Exports) != 1 {
			t.Fatalf("%s: protocol %q TLS %v structured %v, %d exports", v.name, info.Protocol, info.TLS, info.Structured, len(info.Exports))
		}
		got := info.Exports[0]
		want := nbdinfoExport{
			Name: v.name, Description: got.Description, Size: v.size,
			CanCache: true, CanDF: true, CanFastZero: true, CanFlush: true, CanFUA: true,
			CanMultiConn: true, CanTrim: v.trim, CanZero: true,
			BlockMin: 1, BlockPreferred: v.sector, BlockMax: 32 << 20,
		}
		if got != want {
			t.Errorf("nbdinfo --json %s:\n got %+v\nwant %+v", v.name, got, want)
		}
		if !strings.HasPrefix(got.Description, "atrest volume "+v.name+" (drive ") {
			t.Errorf("%s: description %q", v.name, got.Description)
		}
		// Every feature, one nbdinfo --can each, as a script would ask.
		for _, f := range []string{"connect", "read", "write", "flush", "fua", "trim", "zero", "fast-zero", "cache", "multi-conn", "structured-reply", "df"} {
			want := f != "trim" || v.trim
			if got := nbdinfoCan(t, "--can", f, d.uri(v.name)); got != want {
				t.Errorf("nbdinfo --can %s on %s: %v, want %v", f, v.name, got, want)
			}
		}
		for _, f := range []string{"read-only", "rotational"} {
			if nbdinfoCan(t, "--is", f, d.uri(v.name)) {
				t.Errorf("nbdinfo --is %s on %s: true", f, v.name)
			}
		}
	}

	// --list shows every volume; with two there is no default export.
	list := nbdinfo(t, "--list", d.uri(""))
	var names []string
	for _, e := range list.Exports {
		names = append(names, e.Name)
	}
	if !slices.Equal(names, []string{"disc", "plain"}) {
		t.Errorf("nbdinfo --list: exports %q, want disc and plain", names)
	}
	if r := runProg(t, "", 30*time.Second, nil, testutil.Tool(t, "nbdinfo"), "--size", d.uri("")); r.code == 0 {
		t.Errorf("with two volumes the default export answered: %s", r.stdout)
	}
	// The same exports on TCP.
	out := mustProg(t, "", 30*time.Second, testutil.Tool(t, "nbdinfo"), "--size", "nbd://"+tcp+"/plain")
	if n, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64); err != nil || n != 16<<20 {
		t.Errorf("nbdinfo --size over tcp: %q", out)
	}
	d.stop()
}

// TestServeReadOnly: with --read-only every export is read-only (nbdinfo --is
// read-only, no write features), writes are refused with EPERM, and the drive image is
// byte for byte unchanged. With one volume the default export "" serves it too.
func TestServeReadOnly(t *testing.T) {
	t.Parallel()
	testutil.Tool(t, "nbdinfo")
	c := newCluster(t)
	img := c.format("disc", "64M", "--allow-discards")
	before := hashFile(t, img)
	d := c.serve("--read-only", img)

	list := nbdinfo(t, "--list", d.uri(""))
	var got []string
	for _, e := range list.Exports {
		got = append(got, fmt.Sprintf("%q ro=%v", e.Name, e.ReadOnly))
	}
	if want := []string{`"" ro=true`, `"disc" ro=true`}; !slices.Equal(got, want) {
		t.Errorf("nbdinfo --list: %q, want %q", got, want)
	}
	for _, export := range []string{"", "disc"} {
		if !nbdinfoCan(t, "--is", "read-only", d.uri(export)) {
			t.Errorf("export %q is not read-only", export)
		}
		for _, f := range []string{"write", "fua", "trim", "zero", "fast-zero"} {
			if nbdinfoCan(t, "--can", f, d.uri(export)) {
				t.Errorf("read-only export %q: --can %s is true", export, f)
			}
		}
		for _, f := range []string{"connect", "read", "flush", "cache", "multi-conn", "structured-reply"} {
			if !nbdinfoCan(t, "--can", f, d.uri(export)) {
				t.Errorf("read-only export %q: --can %s is false", export, f)
			}
		}
	}
	// A client that writes anyway is refused, and the connection stays usable.
	cl := d.dial("disc")
	// (The project's client refuses it before sending, having seen NBD_FLAG_READ_ONLY.)
	if _, err := cl.WriteAt(make([]byte, 4096), 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Errorf("write to a read-only export: %v, want %v", err, blockdev.ErrReadOnly)
	}
	if _, err := cl.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Errorf("read after a refused write: %v", err)
	}
	if err := cl.Flush(); err != nil {
		t.Errorf("flush of a read-only export: %v", err)
	}
	cl.Close()
	d.stop()
	if after := hashFile(t, img); after != before {
		t.Errorf("a read-only serve changed the drive image")
	}
}
