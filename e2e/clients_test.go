package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/internal/testutil"
)

// qemuTrace runs qemu-io commands against uri with realistic caching (-t none; qemu's
// default puts FUA on every write) and the nbd_send_request trace, and returns the
// output and the requests sent (qemu-io exits 1 when a command failed), as "type flags" (e.g. "write 0x1").
func qemuTrace(t *testing.T, wantExit int, uri string, cmds ...string) (string, map[string]int) {
	t.Helper()
	args := []string{"-f", "raw", "-t", "none", "--trace", "nbd_send_request"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	r := runProg(t, "", 60*time.Second, nil, testutil.Tool(t, "qemu-io"), append(args, uri)...)
	if r.code != wantExit {
		t.Fatalf("qemu-io: exit %d, want %d\n%s%s", r.code, wantExit, r.stdout, r.stderr)
	}
	sent := map[string]int{}
	re := regexp.MustCompile(`nbd_send_request .*\.flags = (0x[0-9a-f]+), \.type = \d+ \(([a-z ]+)\)`)
	for _, m := range re.FindAllStringSubmatch(r.stderr, -1) {
		sent[m[2]+" "+m[1]]++
	}
	return r.stdout, sent
}

// TestServeQemuIO runs a qemu-io script of writes with patterns, FUA writes, flushes,
// zero writes, discards and aio writes against the served volume, reads everything
// back with patterns, and proves from qemu's trace that the FUA, flush, trim and zero
// requests really went out (qemu silently does without what a server does not
// advertise). Then it looks at the drive image itself: the discard punched a hole,
// and the data is not there in plaintext.
func TestServeQemuIO(t *testing.T) {
	t.Parallel()
	testutil.Tool(t, "qemu-io")
	c := newCluster(t)
	img := c.format("disc", "64M", "--allow-discards")
	d := c.serve(img, c.format("plain", "32M"))

	out, sent := qemuTrace(t, 0, d.uri("disc"),
		"write -P 0xab 0 64k",
		"write -f -P 0xcd 64k 4k", // FUA
		"flush",
		"write -P 0x55 128k 64k",
		"write -z 128k 64k",    // WRITE_ZEROES with NO_HOLE
		"write -z -u 192k 64k", // WRITE_ZEROES that may punch a hole
		"write -P 0x77 512k 64k",
		"discard 512k 64k", // TRIM
		"aio_write -P 0x11 1M 64k",
		"aio_write -f -P 0x12 2M 1M", // FUA
		"aio_write -P 0x13 4M 3M",    // one 3 MiB request
		"aio_flush",                  // waits for the aio writes
		"flush",
		"read -P 0xab 0 64k",
		"read -P 0xcd 64k 4k",
		"read -P 0 128k 128k",
		"read -P 0x11 1M 64k",
		"read -P 0x12 2M 1M",
		"read -P 0x13 4M 3M",
		"read -P 0xab 1 65535", // unaligned read inside a sector
	)
	if strings.Contains(out, "failed") {
		t.Fatalf("qemu-io output:\n%s", out)
	}
	for _, want := range []string{
		"write 0x0", "write 0x1", "flush 0x0", "write zeroes 0x2", "write zeroes 0x0",
		"trim 0x0", "read 0x0", "disconnect 0x0",
	} {
		if sent[want] == 0 {
			t.Errorf("qemu-io did not send %q; sent %v", want, sent)
		}
	}
	if sent["write 0x1"] < 2 || sent["flush 0x0"] < 2 {
		t.Errorf("want 2 FUA writes and 2 flushes at least, sent %v", sent)
	}

	// A fast zero (FAST_ZERO|NO_HOLE): an encrypted drive cannot make zeroes faster than
	// it writes them, so the server refuses with ENOTSUP, as the spec allows, changes
	// nothing, and the connection goes on.
	out, sent = qemuTrace(t, 1, d.uri("disc"), "write -P 0x44 256k 64k", "write -z -n 256k 64k", "read -P 0x44 256k 64k")
	if sent["write zeroes 0x12"] != 1 || !strings.Contains(out, "write failed: Operation not supported") || strings.Count(out, "failed") != 1 {
		t.Errorf("fast zero: sent %v\n%s", sent, out)
	}

	// The drive image: the discard reached it as a punched hole (tmpfs), and the
	// written data is there encrypted, not as the plaintext patterns.
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if off, err := unix.Seek(int(f.Fd()), dataOffset+512<<10, unix.SEEK_HOLE); err != nil || off != dataOffset+512<<10 {
		t.Errorf("no hole in the image where the discard was: SEEK_HOLE gives %d, %v", off, err)
	}
	if off, err := unix.Seek(int(f.Fd()), dataOffset+64<<10, unix.SEEK_DATA); err != nil || off != dataOffset+64<<10 {
		t.Errorf("no data in the image where the FUA write was: SEEK_DATA gives %d, %v", off, err)
	}
	raw := make([]byte, 8<<20)
	if _, err := f.ReadAt(raw, dataOffset); err != nil {
		t.Fatal(err)
	}
	for _, p := range []byte{0xab, 0xcd, 0x11, 0x12, 0x13} {
		if bytes.Contains(raw, bytes.Repeat([]byte{p}, 64)) {
			t.Errorf("plaintext pattern %#x found on the drive", p)
		}
	}

	// Without --allow-discards the export has no TRIM: qemu drops the discard without
	// sending it, and everything else works the same.
	out, sent = qemuTrace(t, 0, d.uri("plain"), "write -P 0x21 0 64k", "discard 0 64k", "write -f -z 64k 64k", "flush", "read -P 0x21 0 64k", "read -P 0 64k 64k")
	if strings.Contains(out, "failed") {
		t.Fatalf("qemu-io on plain:\n%s", out)
	}
	if sent["trim 0x0"] != 0 || sent["write zeroes 0x3"] == 0 || sent["flush 0x0"] == 0 {
		t.Errorf("plain export: sent %v, want no trim, a FUA write zeroes and a flush", sent)
	}
	d.stop()
}

// TestServeNbdcopy copies a random image into the served volume and back with nbdcopy
// over four connections (the server advertises multi-conn) and compares.
func TestServeNbdcopy(t *testing.T) {
	t.Parallel()
	nbdcopy := testutil.Tool(t, "nbdcopy")
	c := newCluster(t)
	d := c.serve(c.format("vol", "64M")) // a 48 MiB export

	const size = 40 << 20
	data := randomBytes(size, 1)
	clear(data[8<<20 : 12<<20]) // a run of zeroes, which nbdcopy sends as zero requests
	src, dst := filepath.Join(c.dir, "src.raw"), filepath.Join(c.dir, "dst.raw")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	r := runProg(t, "", 120*time.Second, nil, nbdcopy, "--connections=4", "--threads=4", "--requests=16", "--flush", "-v", src, d.uri("vol"))
	if r.code != 0 {
		t.Fatalf("nbdcopy file → export: exit %d\n%s", r.code, lastLines(r.stderr, 30))
	}
	// libnbd's debug output names each connection's handle: dst0 … dst3.
	conns := map[string]bool{}
	for _, m := range regexp.MustCompile(`libnbd: debug: (dst\d+): nbd_connect_uri: enter`).FindAllStringSubmatch(r.stderr, -1) {
		conns[m[1]] = true
	}
	if len(conns) != 4 {
		t.Errorf("nbdcopy used %d connections to the export, want 4", len(conns))
	}
	if !regexp.MustCompile(`dst\d+: nbd_(aio_)?flush: enter`).MatchString(r.stderr) {
		t.Error("nbdcopy --flush sent no flush")
	}
	if !regexp.MustCompile(`dst\d+: nbd_aio_zero: enter`).MatchString(r.stderr) {
		t.Error("nbdcopy sent no zero request for the run of zeroes")
	}
	r = runProg(t, "", 120*time.Second, nil, nbdcopy, "--connections=4", "--threads=4", "--requests=16", d.uri("vol"), dst)
	if r.code != 0 {
		t.Fatalf("nbdcopy export → file: exit %d\n%s", r.code, r.stderr)
	}
	back, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if len(back) != 48<<20 || !bytes.Equal(back[:size], data) {
		t.Fatalf("the copy back (%d bytes) differs from the source", len(back))
	}
	d.stop()
}

// TestServeFio runs fio's nbd engine, random 4 KiB writes at depth 32 over the whole
// volume, each verified with crc32c when read back.
func TestServeFio(t *testing.T) {
	t.Parallel()
	fio := testutil.Tool(t, "fio")
	c := newCluster(t)
	d := c.serve(c.format("vol", "48M")) // a 32 MiB export
	work := t.TempDir()
	r := runProg(t, work, 120*time.Second, nil, fio, fioArgs(d.uri("vol"),
		"--name=randwrite-verify", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1")...)
	if r.code != 0 {
		t.Fatalf("fio: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	res := fioJSON(t, r.stdout)
	if res.Error != 0 || res.Write.IOBytes != 32<<20 || res.Read.IOBytes != 32<<20 {
		t.Fatalf("fio: error %d, wrote %d and verified %d bytes, want 0 and 32 MiB each", res.Error, res.Write.IOBytes, res.Read.IOBytes)
	}
	t.Logf("fio: %d writes and %d verified reads, longest latency %.1f ms", res.Write.TotalIOs, res.Read.TotalIOs, max(res.Write.Lat.Max, res.Read.Lat.Max)/1e6)
	emptyDir(t, work)
	d.stop()
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
