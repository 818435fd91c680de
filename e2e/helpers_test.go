package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/nbd"
)

var (
	// atrestBin is the binary under test, built by TestMain.
	atrestBin string
	// raceBuild is set by race_test.go when the tests run with -race; the binary is
	// then built with -race as well.
	raceBuild bool
)

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "atrest-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	atrestBin = filepath.Join(dir, "atrest")
	if err := buildAtrest(atrestBin); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

// buildAtrest builds ./cmd/atrest from the module root into out. `go test` puts
// GOROOT/bin first in PATH, so "go" is the toolchain that runs the tests.
func buildAtrest(out string) error {
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	args := []string{"build", "-o", out}
	if raceBuild {
		args = append(args, "-race")
	}
	cmd := exec.Command("go", append(args, "./cmd/atrest")...)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/atrest: %v\n%s", err, b)
	}
	return nil
}

// cleanEnv is the test's environment without what would make a child talk to a real
// service manager or pick up another keystore.
func cleanEnv(extra ...string) []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool {
		for _, p := range []string{"NOTIFY_SOCKET=", "LISTEN_PID=", "LISTEN_FDS=", "LISTEN_FDNAMES=", "ATREST_KEYSTORE=", "ATREST_CONTROL="} {
			if strings.HasPrefix(kv, p) {
				return true
			}
		}
		return false
	})
	if raceBuild {
		// A -race binary sleeps a second before it exits (to let racing goroutines
		// report); 50 ms is enough here and saves a second per atrest run.
		env = append(env, "GORACE=atexit_sleep_ms=50")
	}
	return append(env, extra...)
}

// scratch returns a new directory on tmpfs (drive images, sockets, keystore), removed
// when the test ends (after the processes that use it: cleanups run last-in first-out).
func scratch(t *testing.T) string {
	t.Helper()
	base := "/dev/shm"
	if !isTmpfs(base) {
		if base = os.TempDir(); !isTmpfs(base) {
			testutil.Unavailable(t, "neither /dev/shm nor %s is a tmpfs", base)
		}
	}
	dir, err := os.MkdirTemp(base, "atrest-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func isTmpfs(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.TMPFS_MAGIC
}

// result is what a finished command left.
type result struct {
	stdout, stderr string
	code           int            // exit status, -1 if killed by a signal
	signal         syscall.Signal // the signal that killed it, if any
}

func resultOf(t testing.TB, err error, stdout, stderr string) result {
	t.Helper()
	r := result{stdout: stdout, stderr: stderr}
	var other error
	if r.code, r.signal, other = testutil.ExitStatus(err); other != nil {
		t.Fatal(other)
	}
	return r
}

// runProg runs a program in dir ("" for the current one) and returns what it left; it
// fails the test if the program outlives timeout (and kills it).
func runProg(t testing.TB, dir string, timeout time.Duration, env []string, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir, cmd.Env = dir, env
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("%s %s: still running after %v, killed\n%s%s", filepath.Base(name), strings.Join(args, " "), timeout, so.String(), se.String())
	}
	return resultOf(t, err, so.String(), se.String())
}

// mustProg is runProg that requires exit status 0 and returns stdout.
func mustProg(t testing.TB, dir string, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	r := runProg(t, dir, timeout, nil, name, args...)
	if r.code != 0 {
		t.Fatalf("%s %s: exit %d\n%s%s", filepath.Base(name), strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// cluster is a keystore on tmpfs and the drive images formatted into it.
type cluster struct {
	t   *testing.T
	dir string // tmpfs scratch directory: images, sockets
	ks  string // keystore directory
}

// newCluster makes a scratch directory and runs `atrest init` there.
func newCluster(t *testing.T) *cluster {
	t.Helper()
	testutil.Root(t) // the keystore refuses files that root does not own
	return newClusterIn(t, scratch(t), "keystore")
}

// newClusterIn runs `atrest init` for another cluster in an existing directory.
func newClusterIn(t *testing.T, dir, name string) *cluster {
	t.Helper()
	c := &cluster{t: t, dir: dir, ks: filepath.Join(dir, name)}
	if out := c.must("init"); !strings.Contains(out, "Cluster UUID: ") {
		t.Fatalf("atrest init: %s", out)
	}
	return c
}

// run runs atrest with ATREST_KEYSTORE pointing at the cluster's keystore.
func (c *cluster) run(args ...string) result {
	c.t.Helper()
	return runProg(c.t, c.dir, 60*time.Second, cleanEnv("ATREST_KEYSTORE="+c.ks, "ATREST_CONTROL="+c.control()), atrestBin, args...)
}

func (c *cluster) must(args ...string) string {
	c.t.Helper()
	r := c.run(args...)
	if r.code != 0 {
		c.t.Fatalf("atrest %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// format creates DIR/VOLUME.img with `atrest drive format --create SIZE` and returns
// its path. The data segment starts 16 MiB into the image.
func (c *cluster) format(volume, size string, flags ...string) string {
	c.t.Helper()
	p := filepath.Join(c.dir, volume+".img")
	args := append([]string{"drive", "format", "--create", size, "--volume", volume}, flags...)
	c.must(append(args, p)...)
	return p
}

// dataOffset is where the data segment of every atrest drive starts (docs/luks2-profile.md).
const dataOffset = 16 << 20

// logFile is a child's stdout and stderr, written straight to a file: what the child
// wrote before it sent READY=1 is in the file when the test sees READY=1 (a pipe and a
// copying goroutine would give no such order).
type logFile struct {
	t testing.TB
	f *os.File
}

func newLogFile(t testing.TB, dir string) *logFile {
	t.Helper()
	f, err := os.CreateTemp(dir, "serve-*.log")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &logFile{t: t, f: f}
}

func (l *logFile) String() string {
	b, err := os.ReadFile(l.f.Name())
	if err != nil {
		l.t.Errorf("read the daemon's log: %v", err)
	}
	return string(b)
}

// notifySocket is a fake systemd NOTIFY_SOCKET: a datagram socket that records the
// states a child sends with sd_notify.
type notifySocket struct {
	path    string
	conn    *net.UnixConn
	mu      sync.Mutex
	states  []string      // every line received, in order
	arrived chan struct{} // one token after each datagram
}

func newNotifySocket(t *testing.T, dir string) *notifySocket {
	t.Helper()
	f, err := os.CreateTemp(dir, "notify-*.sock")
	if err != nil {
		t.Fatal(err)
	}
	path := f.Name()
	f.Close()
	os.Remove(path)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	n := &notifySocket{path: path, conn: conn, arrived: make(chan struct{}, 1)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			k, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.states = append(n.states, strings.Split(strings.TrimSpace(string(buf[:k])), "\n")...)
			n.mu.Unlock()
			select {
			case n.arrived <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() { conn.Close(); <-done })
	return n
}

// has reports whether the state line (e.g. "READY=1") was received.
func (n *notifySocket) has(state string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Contains(n.states, state)
}

// sync returns once every datagram sent before it was called has been recorded: it
// sends one of its own, which the socket queues behind them, and waits for it.
func (n *notifySocket) sync(t testing.TB) {
	t.Helper()
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	marker := fmt.Sprintf("E2E_SYNC=%d", time.Now().UnixNano())
	if _, err := c.Write([]byte(marker)); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(30 * time.Second)
	for !n.has(marker) {
		select {
		case <-n.arrived:
		case <-timeout:
			t.Fatal("the notify socket's reader is stuck")
		}
	}
}

func (n *notifySocket) all() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.states)
}

// daemon is a running `atrest serve`.
type daemon struct {
	t      *testing.T
	sock   string // the unix socket it serves on
	cmd    *exec.Cmd
	stderr *logFile // its stdout and stderr
	notify *notifySocket
	done   chan struct{} // closed once the process has been reaped
	// ownsSocket: the daemon creates sock itself (--listen), so a clean stop removes it.
	ownsSocket bool
}

// spawnOpts start a daemon. By default: `atrest serve --listen unix:SOCK ARGS...`.
type spawnOpts struct {
	args  []string   // after "serve": drives and flags
	sock  string     // default DIR/nbd.sock
	raw   bool       // do not add --listen (socket activation, error tests)
	argv  []string   // run argv[0] with argv[1:], "serve" and the arguments (wrappers)
	env   []string   // added to the environment
	extra []*os.File // inherited as descriptors 3, 4, ...
}

// spawn starts `atrest serve` under a fake notify socket without waiting for it.
// The process is killed (SIGKILL) when the test ends if it still runs, and its stderr
// is logged if the test failed.
func (c *cluster) spawn(o spawnOpts) *daemon {
	t := c.t
	t.Helper()
	o.sock = c.sockPath(o)
	args := []string{"serve"}
	if !o.raw {
		args = append(args, "--listen", "unix:"+o.sock)
	}
	args = append(args, o.args...)
	name := atrestBin
	if len(o.argv) > 0 {
		name, args = o.argv[0], append(slices.Clone(o.argv[1:]), args...)
	}
	d := &daemon{t: t, sock: o.sock, stderr: newLogFile(t, c.dir), notify: newNotifySocket(t, c.dir), done: make(chan struct{}), ownsSocket: !o.raw}
	d.cmd = exec.Command(name, args...)
	d.cmd.Dir = c.dir
	d.cmd.Env = cleanEnv(append([]string{"ATREST_KEYSTORE=" + c.ks, "ATREST_CONTROL=" + o.sock + ".ctl", "NOTIFY_SOCKET=" + d.notify.path}, o.env...)...)
	d.cmd.Stdout, d.cmd.Stderr = d.stderr.f, d.stderr.f
	d.cmd.ExtraFiles = o.extra
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.cmd.Wait(); close(d.done) }()
	t.Cleanup(func() {
		if !d.exited() {
			d.cmd.Process.Kill()
			<-d.done
		}
		if t.Failed() {
			t.Logf("atrest serve (pid %d) output:\n%s", d.cmd.Process.Pid, d.stderr.String())
		}
	})
	return d
}

// control is the control socket of the cluster's default daemon (DIR/nbd.sock's):
// the commands run reach it through ATREST_CONTROL. Each daemon's control socket is its
// NBD socket's path with ".ctl" added, so that daemons of parallel tests never share
// one (the default, /run/atrest/control.sock, is the machine's).
func (c *cluster) control() string { return filepath.Join(c.dir, "nbd.sock.ctl") }

// sockPath is the socket a daemon started with o serves on.
func (c *cluster) sockPath(o spawnOpts) string {
	if o.sock != "" {
		return o.sock
	}
	return filepath.Join(c.dir, "nbd.sock")
}

// serve starts `atrest serve --listen unix:DIR/nbd.sock ARGS...` and waits for READY=1.
func (c *cluster) serve(args ...string) *daemon {
	c.t.Helper()
	d := c.spawn(spawnOpts{args: args})
	d.waitReady()
	return d
}

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// waitReady waits for READY=1 on the notify socket: the daemon sends it only once its
// exports answered a read (its self-check). A daemon that exits first fails the test.
func (d *daemon) waitReady() {
	d.t.Helper()
	timeout := time.NewTimer(60 * time.Second)
	defer timeout.Stop()
	for !d.notify.has("READY=1") {
		select {
		case <-d.notify.arrived:
		case <-d.done:
			d.notify.sync(d.t)
			d.t.Fatalf("atrest serve exited (%v) before READY=1:\n%s", d.cmd.ProcessState, d.stderr.String())
		case <-timeout.C:
			d.t.Fatalf("atrest serve sent no READY=1 within 60 s (states %q):\n%s", d.notify.all(), d.stderr.String())
		}
	}
}

// wait waits for the process to end and returns its exit status.
func (d *daemon) wait(timeout time.Duration) result {
	d.t.Helper()
	select {
	case <-d.done:
	case <-time.After(timeout):
		d.t.Fatalf("atrest serve still running %v later:\n%s", timeout, d.stderr.String())
	}
	d.notify.sync(d.t) // what it sent before it exited is recorded
	return result{stderr: d.stderr.String(), code: d.cmd.ProcessState.ExitCode(), signal: testutil.KilledBy(d.cmd.ProcessState)}
}

// stop sends SIGTERM and checks a clean stop (see stopped). It returns how long it took.
func (d *daemon) stop() time.Duration {
	d.t.Helper()
	start := d.term()
	d.stopped()
	return time.Since(start)
}

// term sends SIGTERM and returns when.
func (d *daemon) term() time.Time {
	d.t.Helper()
	start := time.Now()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		d.t.Fatal(err)
	}
	return start
}

// stopped waits for the daemon to end after SIGTERM and checks a clean stop:
// STOPPING=1, the drain-and-flush log lines, exit status 0 (and, under -race, no data
// race reported), the socket it made removed.
func (d *daemon) stopped() {
	d.t.Helper()
	r := d.wait(60 * time.Second)
	if r.code != 0 {
		d.t.Fatalf("atrest serve exited with %d (signal %v) after SIGTERM, want 0:\n%s", r.code, r.signal, r.stderr)
	}
	for _, want := range []string{"atrest serve: stopping: draining requests and flushing drives\n", "atrest serve: stopped\n"} {
		if !strings.Contains(r.stderr, want) {
			d.t.Fatalf("no %q in the output after SIGTERM:\n%s", strings.TrimSpace(want), r.stderr)
		}
	}
	if strings.Contains(r.stderr, "DATA RACE") {
		d.t.Fatalf("the race detector found a race in atrest serve:\n%s", r.stderr)
	}
	if !d.notify.has("STOPPING=1") {
		d.t.Fatalf("no STOPPING=1 sent to the notify socket (got %q)", d.notify.all())
	}
	if _, err := os.Lstat(d.sock); d.ownsSocket && !errors.Is(err, os.ErrNotExist) {
		d.t.Fatalf("socket %s left behind after a clean stop (%v)", d.sock, err)
	}
}

// kill sends SIGKILL and waits for the process to die of it.
func (d *daemon) kill() {
	d.t.Helper()
	if err := d.cmd.Process.Kill(); err != nil {
		d.t.Fatal(err)
	}
	if r := d.wait(30 * time.Second); r.signal != syscall.SIGKILL {
		d.t.Fatalf("atrest serve ended with %d/%v, not by SIGKILL:\n%s", r.code, r.signal, r.stderr)
	}
}

// uri is the NBD URI of an export of d.
func (d *daemon) uri(export string) string {
	return "nbd+unix:///" + export + "?socket=" + d.sock
}

// dial connects the project's NBD client to an export, with no reconnection and no
// replay log, so that every error reaches the test. The client is the volume's writer
// until it is closed (docs/nbd.md).
func (d *daemon) dial(export string) *nbd.Client {
	d.t.Helper()
	return d.dialWith(export, nbd.ClientOptions{})
}

// dialReader is dial for a client that only reads: it never holds the volume, so a
// mount or another writer may come and go while it is open.
func (d *daemon) dialReader(export string) *nbd.Client {
	d.t.Helper()
	return d.dialWith(export, nbd.ClientOptions{ReadOnly: true})
}

func (d *daemon) dialWith(export string, o nbd.ClientOptions) *nbd.Client {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	o.Export, o.Connections, o.ReconnectTimeout, o.ReplayBytes = export, 1, -1, -1
	cl, err := nbd.Dial(ctx, "unix:"+d.sock, o)
	if err != nil {
		d.t.Fatalf("dial export %q: %v", export, err)
	}
	d.t.Cleanup(func() { cl.Close() })
	return cl
}

// hashFile returns the SHA-256 of a file, to prove that nothing was written to it.
func hashFile(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// fioJSON parses fio's --output-format=json(+) output, after the "fio: connected to
// NBD server" line that the nbd engine prints first (and those of a SIGINT).
func fioJSON(t testing.TB, out string) fioJob {
	t.Helper()
	if i := strings.Index(out, "\n{"); i >= 0 {
		out = out[i+1:]
	}
	var v struct {
		Jobs []fioJob `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil || len(v.Jobs) != 1 {
		t.Fatalf("fio output (%v):\n%s", err, out)
	}
	return v.Jobs[0]
}

// fioJob is what the tests read of a job in fio's JSON output.
type fioJob struct {
	Error int      `json:"error"` // the errno that ended the job (EILSEQ for a verify failure)
	Read  fioStats `json:"read"`  // with verify: the reads that checked the data
	Write fioStats `json:"write"`
}

type fioStats struct {
	IOBytes  int64 `json:"io_bytes"`
	TotalIOs int64 `json:"total_ios"`
	Lat      struct {
		Max float64 `json:"max"`
	} `json:"lat_ns"`
}

// fioArgs are the arguments every fio run here shares: the nbd engine, JSON output, and
// no verify state file (fio writes local-*-verify.state into its working directory).
func fioArgs(uri string, extra ...string) []string {
	return append([]string{"--ioengine=nbd", "--uri=" + uri, "--output-format=json+", "--verify_state_save=0"}, extra...)
}

// emptyDir fails the test if dir holds anything: a tool left a file behind.
func emptyDir(t testing.TB, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		t.Errorf("%s left %s behind", dir, e.Name())
	}
}

// randomBytes returns n reproducible pseudo-random bytes for a seed (xorshift; enough
// to tell blocks apart and to defeat zero detection).
func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	x := seed*0x9E3779B97F4A7C15 + 1
	for i := 0; i < n; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(x >> (8 * j))
		}
	}
	return b
}
