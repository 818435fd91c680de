package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/internal/testutil"
)

// TestMountServeRestart: fio writes and verifies (crc32c, verify_backlog: reads check
// the blocks written so far, all along) a file in the mounted ext4 while `atrest serve`
// is restarted twice under it, once with SIGTERM and once with kill -9. The mount's NBD
// client reconnects and replays; fio sees no error, ext4 none either, and the volume
// unmounts cleanly.
func TestMountServeRestart(t *testing.T) {
	t.Parallel()
	requireMount(t)
	fio := testutil.Tool(t, "fio")
	c := newCluster(t)
	img := c.format("busy", "192M")
	d := c.serve(img)
	mp := filepath.Join(c.dir, "mnt")
	m := c.mount(d.uri("busy"), mp)

	klog := followKernelLog(t)
	// fio's working directory is a temporary one: no verify state file lands in the
	// repository.
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	target := filepath.Join(mp, "fio.dat")
	cmd := exec.CommandContext(ctx, fio, "--name=restart", "--filename="+target, "--size=64M",
		"--rw=randwrite", "--bs=16k", "--ioengine=libaio", "--direct=1", "--iodepth=16",
		"--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1", "--verify_state_save=0",
		"--time_based", "--runtime=8", "--output-format=json")
	cmd.Dir = t.TempDir()
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan error, 1)
	go func() { fioDone <- cmd.Wait() }()
	running := func(when string) {
		t.Helper()
		select {
		case err := <-fioDone:
			t.Fatalf("fio ended (%v) %s: the restarts did not happen under load\n%s%s", err, when, out.String(), errOut.String())
		default:
		}
	}
	// Wait until fio writes: its file has been laid out in full.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if st, err := os.Stat(target); err == nil && st.Size() == 64<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("fio did not lay out its file within 30 s")
		}
		running("before it started writing")
	}
	time.Sleep(time.Second) // a second of I/O on the first daemon
	running("on the first daemon")

	took := d.stop()
	d = c.serve(img)
	t.Logf("SIGTERM restart: stopped in %v", took.Round(time.Millisecond))
	running("after the SIGTERM restart")
	time.Sleep(time.Second)

	start := time.Now()
	d.kill()
	d = c.serve(img)
	// Take the mount down before the test's cleanups kill this daemon.
	t.Cleanup(func() { umountLeftovers(t, c, mp) })
	t.Logf("kill -9 restart: serving again after %v", time.Since(start).Round(time.Millisecond))
	running("after the kill -9 restart")

	if err := <-fioDone; err != nil {
		t.Fatalf("fio: %v\n%s%s", err, out.String(), errOut.String())
	}
	job := fioJSON(t, out.String())
	if job.Error != 0 || job.Read.IOBytes == 0 || job.Write.IOBytes == 0 {
		t.Fatalf("fio: error %d, %d bytes verified, %d written\n%s", job.Error, job.Read.IOBytes, job.Write.IOBytes, errOut.String())
	}
	t.Logf("fio: %d MiB written, %d MiB read back and verified, no error", job.Write.IOBytes>>20, job.Read.IOBytes>>20)
	log := m.log.String()
	if !strings.Contains(log, "nbd: ") {
		t.Errorf("the mount's log shows no reconnect:\n%s", log)
	}
	if errs := klog.errorsOf(filepath.Base(m.state()["loop"].(string))); len(errs) > 0 {
		t.Errorf("the kernel logged errors of the volume during the restarts:\n%s", strings.Join(errs, "\n"))
	}
	m.umount()
}
