package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/nbd"
)

// readAll reads a whole export through the project's client.
func readAll(t *testing.T, cl *nbd.Client) []byte {
	t.Helper()
	b := make([]byte, cl.Size())
	if _, err := cl.ReadAt(b, 0); err != nil {
		t.Fatalf("read the export: %v", err)
	}
	return b
}

// volumeKey asks cryptsetup for a drive's volume key with the cluster's master key.
func volumeKey(t *testing.T, c *cluster, img string) string {
	t.Helper()
	out := mustProg(t, "", 60*time.Second, testutil.Tool(t, "cryptsetup"), "luksDump", "--dump-volume-key", "--batch-mode",
		"--key-file", filepath.Join(c.ks, "master.key"), img)
	_, dump, ok := strings.Cut(out, "MK dump:")
	if !ok {
		t.Fatalf("no MK dump in cryptsetup's output:\n%s", out)
	}
	var hexKey strings.Builder
	for i, line := range strings.Split(dump, "\n") {
		if i > 0 && !strings.HasPrefix(line, "\t") && !strings.HasPrefix(line, " ") {
			break
		}
		hexKey.WriteString(strings.Join(strings.Fields(line), ""))
	}
	if k, err := hex.DecodeString(hexKey.String()); err != nil || len(k) != 64 {
		t.Fatalf("volume key %q from cryptsetup: %v", hexKey.String(), err)
	}
	return hexKey.String()
}

// oracle decrypts ranges ("OFFSET:LENGTH", sector-aligned) of a drive's data segment
// with python3-cryptography and returns their plaintexts, concatenated.
func oracle(t *testing.T, img, key string, sector int64, ranges ...string) []byte {
	t.Helper()
	args := append([]string{"testdata/xts_oracle.py", img, key, strconv.Itoa(dataOffset), strconv.FormatInt(sector, 10)}, ranges...)
	return []byte(mustProg(t, "", 60*time.Second, testutil.Python3(t), args...))
}

// TestServeKill9Durability writes through the NBD client (plain, unaligned, FUA and
// zero writes) and flushes, kills `atrest serve` with SIGKILL, restarts it on the
// stale socket, and reads every byte of both volumes back: identical to the model. Then
// an independent path: cryptsetup gives the volume key from the master key file, and
// python3-cryptography decrypts the written sectors from the image to the same bytes.
// Both sector sizes, so that the IV in 512-byte units is checked for 4096 too.
func TestServeKill9Durability(t *testing.T) {
	t.Parallel()
	testutil.Tool(t, "cryptsetup")
	testutil.Python3(t)
	c := newCluster(t)
	vols := []struct {
		name   string
		sector int64
	}{{"d4k", 4096}, {"d512", 512}}
	var imgs []string
	for _, v := range vols {
		imgs = append(imgs, c.format(v.name, "48M", "--sector-size", strconv.FormatInt(v.sector, 10)))
	}
	type write struct {
		off int64
		n   int
		how string // "write", "fua", "zero"
	}
	writes := []write{
		{0, 64 << 10, "write"},
		{12345, 70000, "write"}, // unaligned: read-modify-write of partial sectors
		{1<<20 + 512, 4096, "fua"},
		{5 << 20, 1 << 20, "write"},
		{8<<20 + 100, 3000, "fua"},
		{20 << 20, 256 << 10, "zero"},
		{31 << 20, 1 << 20, "write"},
	}

	d := c.serve(imgs...)
	models := map[string][]byte{}
	for i, v := range vols {
		cl := d.dial(v.name)
		model := readAll(t, cl) // unwritten sectors are noise; they must stay the same noise
		for j, w := range writes {
			var err error
			switch data := randomBytes(w.n, uint64(i*100+j+1)); w.how {
			case "write":
				_, err = cl.WriteAt(data, w.off)
				copy(model[w.off:], data)
			case "fua":
				_, err = cl.WriteAtFUA(data, w.off)
				copy(model[w.off:], data)
			case "zero":
				err = cl.WriteZeroes(w.off, int64(w.n), 0)
				clear(model[w.off : w.off+int64(w.n)])
			}
			if err != nil {
				t.Fatalf("%s %s at %d: %v", v.name, w.how, w.off, err)
			}
		}
		if err := cl.Flush(); err != nil {
			t.Fatalf("flush %s: %v", v.name, err)
		}
		cl.Close()
		models[v.name] = model
	}
	d.kill()
	if _, err := os.Lstat(d.sock); err != nil {
		t.Fatalf("the killed daemon's socket is gone (%v): the restart would not be tested on a stale socket", err)
	}

	d = c.serve(imgs...)
	for _, v := range vols {
		cl := d.dial(v.name)
		if got := readAll(t, cl); !bytes.Equal(got, models[v.name]) {
			t.Errorf("%s after kill -9 and restart: %s", v.name, firstDiff(got, models[v.name]))
		}
		cl.Close()
	}
	d.stop()

	for i, v := range vols {
		var ranges []string
		var want []byte
		for _, w := range writes {
			lo := w.off / v.sector * v.sector
			hi := (w.off + int64(w.n) + v.sector - 1) / v.sector * v.sector
			ranges = append(ranges, fmt.Sprintf("%d:%d", lo, hi-lo))
			want = append(want, models[v.name][lo:hi]...)
		}
		if got := oracle(t, imgs[i], volumeKey(t, c, imgs[i]), v.sector, ranges...); !bytes.Equal(got, want) {
			t.Errorf("%s: python3-cryptography decrypts the written sectors %v differently: %s", v.name, ranges, firstDiff(got, want))
		}
	}
}

// firstDiff describes where two byte slices first differ.
func firstDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("%d bytes, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at byte %d", i)
		}
	}
	return "equal"
}

// TestServeSIGTERMInFlight sends SIGTERM while fio keeps 32 requests in flight, 16
// writers of the project's client write 1 MiB blocks (flushing now and then) on one
// connection, and another client sits idle. The daemon must drain, flush and exit 0
// promptly (not wait out --drain-timeout); fio sees its connection end and exits
// instead of hanging. After a restart every block holds the last version whose write
// was acknowledged; a write that failed (in flight when the connection ended) must not
// have landed, since a drain answers every request the daemon read.
func TestServeSIGTERMInFlight(t *testing.T) {
	t.Parallel()
	fio := testutil.Tool(t, "fio")
	c := newCluster(t)
	img := c.format("vol", "80M") // a 64 MiB export: fio in the first half, the writers in the second
	d := c.serve(img)

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	work := t.TempDir()
	load := exec.CommandContext(ctx, fio, fioArgs(d.uri(""), "--name=load", "--rw=randwrite", "--bs=64k",
		"--iodepth=32", "--size=32M", "--time_based", "--runtime=120")...)
	load.Dir = work
	stdout, err := load.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var fioErr bytes.Buffer
	load.Stderr = &fioErr
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	var fioWait error
	fioDone := make(chan struct{}) // closed when fio has ended, fioWait set
	connected := make(chan struct{})
	go func() {
		br := bufio.NewReader(stdout)
		line, _ := br.ReadString('\n')
		if strings.Contains(line, "connected to NBD server") {
			close(connected)
		}
		io.Copy(io.Discard, br)
		fioWait = load.Wait()
		close(fioDone)
	}()
	t.Cleanup(func() { cancel(); <-fioDone })

	const (
		writers   = 16
		blockSize = 1 << 20 // large enough that some are always being encrypted
		blocks    = 2       // per writer: 2 MiB each, from 32 MiB on
	)
	blockOff := func(w, b int) int64 { return 32<<20 + int64(w*blocks+b)*blockSize }
	blockData := func(w, b int, ver uint64) []byte { return randomBytes(blockSize, uint64(w)<<48|uint64(b)<<32|ver) }
	var (
		acked     [writers][blocks]uint64 // last acknowledged version of each block
		inflight  [writers][blocks]uint64 // the version whose write failed, if any
		writesOK  atomic.Int64
		flushesOK atomic.Int64
		enough    = make(chan struct{})
		once      sync.Once
		wg        sync.WaitGroup
	)
	// One connection: its replies come in order before the end of the stream, so a
	// write that fails was not answered. (With several, the client drops them all when
	// one ends, replies on the others unread.)
	cl := d.dial("vol")
	idle := d.dialReader("vol") // a connection with nothing to do must not hold up the stop
	defer idle.Close()
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				b, ver := i%blocks, uint64(i+1)
				if _, err := cl.WriteAt(blockData(w, b, ver), blockOff(w, b)); err != nil {
					inflight[w][b] = ver
					return
				}
				acked[w][b] = ver
				writesOK.Add(1)
				if i%4 == 3 {
					if err := cl.Flush(); err != nil {
						return
					}
					if flushesOK.Add(1) >= 32 && writesOK.Load() >= 100 {
						once.Do(func() { close(enough) })
					}
				}
			}
		}()
	}
	select {
	case <-connected:
	case <-fioDone:
		t.Fatalf("fio ended before connecting: %v\n%s", fioWait, fioErr.String())
	}
	select {
	case <-enough:
	case <-time.After(60 * time.Second):
		t.Fatal("the writers did not get 100 writes and 32 flushes acknowledged in 60 s")
	}
	took := d.stop()
	if took >= 10*time.Second {
		t.Errorf("SIGTERM took %v: the drain waited for something", took)
	}
	t.Logf("SIGTERM to exit: %v, with %d writes and %d flushes acknowledged", took.Round(time.Millisecond), writesOK.Load(), flushesOK.Load())
	wg.Wait()
	select {
	case <-fioDone:
		t.Logf("fio ended when the server stopped: %v", fioWait)
	case <-time.After(30 * time.Second):
		t.Fatal("fio still runs 30 s after the server stopped")
	}
	cl.Close()
	emptyDir(t, work)

	d = c.serve(img)
	cl = d.dial("vol")
	lost, newer := 0, 0
	buf := make([]byte, blockSize)
	for w := range writers {
		for b := range blocks {
			if acked[w][b] == 0 && inflight[w][b] == 0 {
				continue
			}
			if _, err := cl.ReadAt(buf, blockOff(w, b)); err != nil {
				t.Fatal(err)
			}
			switch {
			case acked[w][b] != 0 && bytes.Equal(buf, blockData(w, b, acked[w][b])):
			case inflight[w][b] != 0 && bytes.Equal(buf, blockData(w, b, inflight[w][b])):
				newer++
				t.Errorf("writer %d block %d holds version %d, whose write failed: the daemon executed it and closed the connection without answering (no drain)", w, b, inflight[w][b])
			default:
				lost++
				t.Errorf("writer %d block %d: neither the acknowledged version %d nor the in-flight %d", w, b, acked[w][b], inflight[w][b])
			}
		}
	}
	if lost > 0 || newer > 0 {
		t.Fatalf("%d blocks lost an acknowledged write, %d hold an unanswered one", lost, newer)
	}
	cl.Close()
	d.stop()
}
