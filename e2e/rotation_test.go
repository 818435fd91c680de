package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/testutil"
)

// TestServeRotationUnderFio rotates the master key five times while fio verifies
// random writes against the served volume and the project's client times 4 KiB
// write+read round trips on another part of it. fio must report no error, every
// rotation must end with "Key rotation complete", and the daemon must not stall: over
// the whole time both clients run, requests keep completing, with no gap of a second
// or more in which neither client saw a completion. Afterwards cryptsetup opens the
// drive with the new master.key and refuses every older one.
//
// Why the gap and not each client's longest request: on this shared two-core machine a
// client process is sometimes descheduled for half a second (fio's longest request
// then reaches 0.5-1 s against nbdkit as well, with no rotation at all), while a
// stall of the daemon, such as a lock held across a rotation, stops both clients at
// once. The longest request of each client is logged.
//
// Not parallel: the other tests of the package wait while it measures.
func TestServeRotationUnderFio(t *testing.T) {
	fio := testutil.Tool(t, "fio")
	cryptsetup := testutil.Tool(t, "cryptsetup")
	c := newCluster(t)
	img := c.format("vol", "64M") // a 48 MiB export: fio on [0, 32M), the client on [40M, 48M)
	// Two writers on disjoint ranges of one volume: they coordinate themselves, which is
	// what --shared-writers is for (docs/nbd.md).
	d := c.serve("--shared-writers", img)
	readKey := func() []byte {
		k, err := os.ReadFile(filepath.Join(c.ks, "master.key"))
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	oldKeys := [][]byte{readKey()}

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	work := t.TempDir()
	job := exec.CommandContext(ctx, fio, fioArgs(d.uri(""), "--name=rotate", "--rw=randwrite", "--bs=4k",
		"--iodepth=8", "--size=32M", "--time_based", "--runtime=300", // until SIGINT
		"--verify=crc32c", "--verify_backlog=1024", "--verify_fatal=1",
		"--write_lat_log="+filepath.Join(work, "rotate"), "--log_avg_msec=0")...)
	job.Dir = work
	stdout, err := job.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var fioOut, fioErr bytes.Buffer
	job.Stderr = &fioErr
	if err := job.Start(); err != nil {
		t.Fatal(err)
	}
	var fioWait error
	fioDone := make(chan struct{})
	connected := make(chan struct{})
	go func() {
		br := bufio.NewReader(stdout)
		line, _ := br.ReadString('\n')
		fioOut.WriteString(line)
		if strings.Contains(line, "connected to NBD server") {
			close(connected)
		}
		io.Copy(&fioOut, br)
		fioWait = job.Wait()
		close(fioDone)
	}()
	t.Cleanup(func() { cancel(); <-fioDone })
	select {
	case <-connected:
	case <-fioDone:
		t.Fatalf("fio ended before connecting: %v\n%s%s", fioWait, fioOut.String(), fioErr.String())
	}
	// fio's log times are milliseconds since its job started, just after it connected.
	fioZero := time.Now()

	// The client's timed round trips, until the rotations are over.
	cl := d.dial("vol")
	var (
		probeMax   time.Duration
		probeDone  []time.Time  // completion of each round trip
		probeN     atomic.Int64 // len(probeDone)
		probeUntil atomic.Int64 // stop after this many round trips (0: go on)
		probeErr   error
		probeEnded = make(chan struct{})
	)
	probeStart := time.Now()
	go func() {
		defer close(probeEnded)
		buf := make([]byte, 4096)
		for i := 0; ; i++ {
			if n := probeUntil.Load(); n > 0 && probeN.Load() >= n {
				return
			}
			off := 40<<20 + int64(i%2048)*4096
			data := randomBytes(4096, uint64(i+1))
			start := time.Now()
			if _, err := cl.WriteAt(data, off); err != nil {
				probeErr = err
				return
			}
			if _, err := cl.ReadAt(buf, off); err != nil {
				probeErr = err
				return
			}
			now := time.Now()
			probeMax = max(probeMax, now.Sub(start))
			probeDone = append(probeDone, now)
			probeN.Add(1)
			if !bytes.Equal(buf, data) {
				probeErr = fmt.Errorf("read back at %d: %s", off, firstDiff(buf, data))
				return
			}
		}
	}()

	// Five rotations, spread over a few seconds, while fio runs.
	const rotations = 5
	var rotated time.Duration
	var rotationTimes []time.Duration // since the client's first round trip began
	for i := range rotations {
		if i > 0 {
			time.Sleep(300 * time.Millisecond) // spread the rotations over fio's run
		}
		start := time.Now()
		out := c.must("rotate-encryption-keys")
		rotated += time.Since(start)
		rotationTimes = append(rotationTimes, start.Sub(probeStart).Round(time.Millisecond))
		if !strings.Contains(out, "Key rotation complete") {
			t.Fatalf("rotation %d: %s", i+1, out)
		}
		if i < rotations-1 {
			oldKeys = append(oldKeys, readKey())
		}
		select {
		case <-fioDone:
			t.Fatalf("fio ended during rotation %d: %v\n%s%s", i+1, fioWait, fioOut.String(), fioErr.String())
		default:
		}
	}
	// Some more I/O after the last rotation, then stop both clients. fio ends its
	// job on SIGINT and still reports, with exit status 128.
	probeUntil.Store(probeN.Load() + 200)
	select {
	case <-probeEnded:
	case <-time.After(60 * time.Second):
		t.Fatal("the client's round trips stalled after the rotations")
	}
	if probeErr != nil {
		t.Fatalf("the client's round trips failed during the rotations: %v", probeErr)
	}
	if err := job.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	select {
	case <-fioDone:
	case <-time.After(60 * time.Second):
		t.Fatal("fio did not end on SIGINT")
	}
	if fioWait != nil && !strings.Contains(fioOut.String(), "fio: terminating on signal 2") {
		t.Fatalf("fio: %v\n%s%s", fioWait, fioOut.String(), fioErr.String())
	}
	res := fioJSON(t, fioOut.String())
	fioMax := time.Duration(max(res.Write.Lat.Max, res.Read.Lat.Max))
	if res.Error != 0 || res.Write.TotalIOs == 0 || res.Read.TotalIOs == 0 {
		t.Fatalf("fio: error %d, %d writes, %d verified reads", res.Error, res.Write.TotalIOs, res.Read.TotalIOs)
	}
	// Every completion of both clients, over the time both ran (which holds every
	// rotation): the longest gap between two is the longest the daemon could have
	// stalled.
	done := append(fioCompletions(t, filepath.Join(work, "rotate_lat.1.log"), fioZero), probeDone...)
	slices.SortFunc(done, time.Time.Compare)
	from, to := probeDone[0], probeDone[len(probeDone)-1]
	var gap time.Duration
	var gapAt time.Time
	for i := 1; i < len(done); i++ {
		if done[i].After(from) && !done[i-1].After(to) && done[i].Sub(done[i-1]) > gap {
			gap, gapAt = done[i].Sub(done[i-1]), done[i-1]
		}
	}
	t.Logf("%d rotations, %v in all; fio: %d writes, %d verified reads, longest request %v; client: %d round trips, longest %v; longest time without any completion: %v",
		rotations, rotated.Round(time.Millisecond), res.Write.TotalIOs, res.Read.TotalIOs, fioMax.Round(time.Microsecond),
		len(probeDone), probeMax.Round(time.Microsecond), gap.Round(time.Microsecond))
	if gap >= time.Second {
		t.Fatalf("the daemon stalled: no request completed for %v from %v into the run (rotations at %v)", gap, gapAt.Sub(from), rotationTimes)
	}
	if ents, _ := filepath.Glob(filepath.Join(work, "*verify.state")); len(ents) > 0 {
		t.Errorf("fio left %q", ents)
	}
	cl.Close()
	d.stop()

	// The drive opens with the new master key only.
	key := filepath.Join(c.ks, "master.key")
	mustProg(t, "", 60*time.Second, cryptsetup, "open", "--test-passphrase", "--key-file", key, img)
	for i, k := range oldKeys {
		p := filepath.Join(t.TempDir(), "old.key")
		if err := os.WriteFile(p, k, 0o600); err != nil {
			t.Fatal(err)
		}
		// cryptsetup's exit status 2: no key available with this passphrase.
		if r := runProg(t, "", 60*time.Second, nil, cryptsetup, "open", "--test-passphrase", "--key-file", p, img); r.code != 2 {
			t.Errorf("the master key from before rotation %d: cryptsetup exit %d, want 2 (refused)\n%s", i+1, r.code, r.stderr)
		}
	}
	// And the daemon unlocks it with the new key after a restart.
	c.serve(img).stop()
}

// fioCompletions reads a fio latency log (--write_lat_log, --log_avg_msec=0: one line
// "msec, nsec, direction, bs[, offset]" per request, msec since the job started) and
// returns the completion times, the job having started at zero.
func fioCompletions(t *testing.T, path string, zero time.Time) []time.Time {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []time.Time
	for line := range strings.Lines(string(b)) {
		ms, _, _ := strings.Cut(line, ",")
		n, err := strconv.ParseInt(strings.TrimSpace(ms), 10, 64)
		if err != nil {
			t.Fatalf("fio latency log line %q: %v", line, err)
		}
		out = append(out, zero.Add(time.Duration(n)*time.Millisecond))
	}
	if len(out) == 0 {
		t.Fatalf("empty fio latency log %s", path)
	}
	return out
}
