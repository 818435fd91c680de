package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// markerEnv is set in the environment of every process the benchmark starts, to the
// work directory: the sweep finds what a killed run left running by it, since children
// of children inherit it (atrest mount's background process, nbdkit).
const markerEnv = "ATREST_BENCH_RUN"

// cleanups is the registry of what the run has set up, taken down in reverse order
// whatever way the run ends.
type cleanups struct {
	mu    sync.Mutex
	steps []cleanupStep
}

type cleanupStep struct {
	what string
	fn   func() error
}

func (c *cleanups) add(what string, fn func() error) {
	c.mu.Lock()
	c.steps = append(c.steps, cleanupStep{what, fn})
	c.mu.Unlock()
}

// run takes every step, last first, and returns the errors of those that failed.
func (c *cleanups) run(logf func(string, ...any)) []error {
	c.mu.Lock()
	steps := c.steps
	c.steps = nil
	c.mu.Unlock()
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		logf("cleanup: %s", steps[i].what)
		if err := steps[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", steps[i].what, err))
		}
	}
	return errs
}

// daemon is a long-running process of a stack (a server, a FUSE daemon).
type daemon struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// start starts a daemon in a process group of its own (a Ctrl-C on the terminal
// reaches the benchmark alone, which then takes the stacks down in order), with its
// output in the log directory. Should the benchmark be killed outright, the daemon
// stays for the sweep (bench/run.sh's trap, or benchrun -sweep), which takes the
// mounts down while their servers still run: a parent-death signal would stop the
// servers first and leave the mounts unable to flush.
func (b *bench) start(name string, env []string, argv ...string) (*daemon, error) {
	log := filepath.Join(b.work, "logs", name+".log")
	f, err := os.Create(log)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = b.env(env...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{name: name, cmd: cmd, log: log, done: make(chan struct{})}
	go func() { cmd.Wait(); close(d.done) }()
	return d, nil
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// stop sends sig and waits up to timeout for the daemon to exit, then kills it.
func (d *daemon) stop(sig syscall.Signal, timeout time.Duration) error {
	if d.exited() {
		return nil
	}
	d.cmd.Process.Signal(sig)
	select {
	case <-d.done:
		return nil
	case <-time.After(timeout):
	}
	d.cmd.Process.Kill()
	<-d.done
	return fmt.Errorf("%s did not exit within %v of %v: killed", d.name, timeout, sig)
}

// waitReady polls ready until it holds, the daemon exits, ctx ends or 60 s pass.
func (b *bench) waitReady(ctx context.Context, d *daemon, ready func() bool) error {
	deadline := time.Now().Add(60 * time.Second)
	for !ready() {
		if d != nil && d.exited() {
			return fmt.Errorf("%s exited before it was ready (%v):\n%s", d.name, d.cmd.ProcessState, tail(d.log, 20))
		}
		if time.Now().After(deadline) {
			msg := ""
			if d != nil {
				msg = ":\n" + tail(d.log, 20)
			}
			return fmt.Errorf("%s not ready within 60 s%s", d.name, msg)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// logHas returns a check that the daemon's log contains s.
func logHas(d *daemon, s string) func() bool {
	return func() bool {
		b, _ := os.ReadFile(d.log)
		return bytes.Contains(b, []byte(s))
	}
}

// run runs a command to its end and returns its standard output; the error carries
// the end of its output.
func (b *bench) run(ctx context.Context, env []string, argv ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = b.env(env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// Kill the whole group: fio forks its jobs.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		out := stderr.String()
		if strings.TrimSpace(out) == "" {
			out = stdout.String()
		}
		out = strings.TrimSpace(lastLines(out, 15))
		return stdout.Bytes(), fmt.Errorf("%s: %w\n%s", strings.Join(argv, " "), err, out)
	}
	return stdout.Bytes(), nil
}

// env is the environment of a child: this process's, the marker and extra.
func (b *bench) env(extra ...string) []string {
	env := append(os.Environ(), markerEnv+"="+b.work)
	return append(env, extra...)
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	return lastLines(string(b), n)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// errStopped is the cause of a run stopped by a signal.
var errStopped = errors.New("stopped by a signal")
