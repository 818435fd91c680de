// Command benchrun is atrest's benchmark: bench/run.sh builds and runs it. In one run
// it sets up every stack a user can put I/O on, with their peers, runs fio jobs on
// each (peers interleaved, repetitions rotated), measures the XTS speed per core
// beside OpenSSL, and writes docs/bench/ (package bench/report): the JSON of every
// figure with the machine and the commit, a Markdown report with the targets, and
// PNG charts; it also updates the README's benchmark section.
//
//	bench/run.sh            # full: 5 repetitions, every job at every level (~23 min on 2 quiet cores)
//	bench/run.sh --quick    # 5 repetitions, shorter runs, fewer jobs above the NBD level (~8 min)
//	bench/run.sh --smoke    # one short run of one job on every peer (scripts/test.sh; < 1 min)
//	benchrun -report docs/bench/results.json   # redraw the report from its JSON
//	benchrun -sweep WORK    # remove what a killed run with work directory WORK left
//	bench/run.sh --hold     # set the stacks up, print where they are, wait for Ctrl-C (profiling)
//
// The orchestration is Go rather than shell because what it must get right is the
// teardown: a run sets up some twenty processes, FUSE mounts, loop devices and ext4
// mounts that depend on one another, and must take them down in order on every exit,
// Ctrl-C and a failure halfway included. Here each piece registers its cleanup as it
// is set up (cleanups), children run in process groups of their own so that a Ctrl-C
// reaches the benchmark alone, and a final sweep checks that nothing is left; the
// same sweep is what bench/run.sh's trap runs should the program itself be killed.
// The statistics (per-repetition ratios, medians, spreads), the JSON and the charts
// are Go too, which leaves run.sh a thin entry point.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/atrest/atrest/bench/report"
)

type bench struct {
	repo    string // the repository's root
	work    string // scratch directory: binaries, sockets, logs, mount points
	images  string // drive images (tmpfs)
	bin     string
	mode    mode
	clean   *cleanups
	targets map[string]target // by "level/peer"
	rep     *report.Report
	started time.Time
}

func main() {
	quick := flag.Bool("quick", false, "fewer jobs and shorter runs (about 8 minutes)")
	smoke := flag.Bool("smoke", false, "one short run of one job on every peer: checks the harness (under a minute)")
	hold := flag.Bool("hold", false, "set the stacks up, print where they are and wait for a signal (for profiling)")
	reps := flag.Int("reps", 0, "repetitions (default: the mode's)")
	runtimeFlag := flag.Duration("runtime", 0, "measured time per fio run (default: the mode's)")
	out := flag.String("out", "", "report directory (default docs/bench; for --smoke, a directory in the work directory)")
	work := flag.String("work", "", "scratch directory, made by bench/run.sh (default: a new one in /tmp)")
	images := flag.String("images", "/dev/shm", "directory for the drive images (tmpfs)")
	allowDirty := flag.Bool("allow-dirty", false, "run on a tree with uncommitted changes (the report says so)")
	sweepDir := flag.String("sweep", "", "remove what a run with this work directory left behind, and exit")
	redraw := flag.String("report", "", "write the report of this results.json again (its directory), and exit")
	var notes notesFlag
	flag.Var(&notes, "note", "a note for the report, e.g. about the machine's load (repeatable)")
	flag.Parse()
	if flag.NArg() > 0 {
		fatalf("unexpected arguments %q (see -help)", flag.Args())
	}

	switch {
	case *sweepDir != "":
		if found := sweep(*sweepDir); len(found) > 0 {
			fmt.Fprintf(os.Stderr, "benchrun: swept %d thing(s) left by the run in %s\n", len(found), *sweepDir)
		}
		os.Exit(0)
	case *redraw != "":
		r, err := report.Read(*redraw)
		if err != nil {
			fatalf("%v", err)
		}
		if err := report.Write(filepath.Dir(*redraw), r); err != nil {
			fatalf("%v", err)
		}
		os.Exit(0)
	}

	name := "full"
	switch {
	case *quick && *smoke:
		fatalf("--quick or --smoke, not both")
	case *quick:
		name = "quick"
	case *smoke:
		name = "smoke"
	}
	m := modes[name]
	if *reps > 0 {
		m.reps = *reps
	}
	if *runtimeFlag > 0 {
		m.runtime = *runtimeFlag
	}
	os.Exit(run(m, *out, *work, *images, *allowDirty, *hold, notes))
}

type notesFlag []string

func (n *notesFlag) String() string     { return strings.Join(*n, "; ") }
func (n *notesFlag) Set(s string) error { *n = append(*n, s); return nil }

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "benchrun: "+format+"\n", args...)
	os.Exit(2)
}

// run is the benchmark; it returns the exit code: 0, 1 on failure, 130 when stopped
// by a signal.
func run(m mode, out, work, imagesBase string, allowDirty, hold bool, notes []string) int {
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		for sig := range sigs {
			if ctx.Err() == nil {
				fmt.Fprintf(os.Stderr, "\nbenchrun: %v: stopping; taking the stacks down\n", sig)
				cancel(errStopped)
			} else {
				fmt.Fprintf(os.Stderr, "\nbenchrun: %v: still taking the stacks down (SIGKILL leaves them to bench/run.sh's sweep)\n", sig)
			}
		}
	}()

	b := &bench{mode: m, clean: &cleanups{}, targets: map[string]target{}, started: time.Now()}
	code := 0
	err := b.main(ctx, out, work, imagesBase, allowDirty, hold, notes)
	switch {
	case errors.Is(context.Cause(ctx), errStopped):
		code = 130
		fmt.Fprintln(os.Stderr, "benchrun: stopped")
	case err != nil:
		code = 1
		fmt.Fprintf(os.Stderr, "benchrun: %v\n", err)
	}
	if errs := b.teardown(work == ""); len(errs) > 0 {
		for _, e := range errs {
			fmt.Fprintf(os.Stderr, "benchrun: cleanup: %v\n", e)
		}
		if code == 0 {
			code = 1
		}
	}
	return code
}

// main sets up, measures and writes the report.
func (b *bench) main(ctx context.Context, out, work, imagesBase string, allowDirty, hold bool, notes []string) error {
	var err error
	// Paths given on the command line are the caller's, not the repository's.
	for _, p := range []*string{&out, &work, &imagesBase} {
		if *p != "" {
			if *p, err = filepath.Abs(*p); err != nil {
				return err
			}
		}
	}
	if b.repo, err = repoRoot(); err != nil {
		return err
	}
	if err := os.Chdir(b.repo); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (loop devices, FUSE and ext4 mounts)")
	}
	for _, tool := range []string{"go", "git", "fio", "nbdkit", "nbdfuse", "nbdinfo", "cryptsetup", "openssl",
		"losetup", "mkfs.ext4", "dumpe2fs", "mount", "umount", "fusermount3"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is not installed (scripts/install-deps.sh)", tool)
		}
	}
	steps, err := b.mode.steps()
	if err != nil {
		return err
	}

	commit, dirty, err := gitState(ctx, b.repo)
	if err != nil {
		return fmt.Errorf("git: %w", err)
	}
	defaultOut := out == ""
	if defaultOut {
		out = filepath.Join(b.repo, "docs", "bench")
	}
	if defaultOut && b.mode.name != "smoke" {
		// Checked now rather than after the run.
		readme, err := os.ReadFile(filepath.Join(b.repo, "README.md"))
		if err != nil {
			return err
		}
		if withoutSection(string(readme)) == string(readme) {
			return fmt.Errorf("README.md has no benchmark section (%q ... %q) to update", readmeBegin, readmeEnd)
		}
	}
	if dirty && !allowDirty && b.mode.name != "smoke" && !hold {
		return fmt.Errorf("the tree has uncommitted changes (git status): commit them first, or --allow-dirty (the report then says so)")
	}

	if work == "" {
		if work, err = os.MkdirTemp("", "atrest-bench."); err != nil {
			return err
		}
	}
	if b.work, err = filepath.Abs(work); err != nil {
		return err
	}
	if b.mode.name == "smoke" && defaultOut {
		out = filepath.Join(b.work, "report")
		defaultOut = false
	}
	b.bin = filepath.Join(b.work, "bin")
	for _, d := range []string{b.bin, filepath.Join(b.work, "logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if b.images, err = os.MkdirTemp(imagesBase, "atrest-bench-images."); err != nil {
		return fmt.Errorf("the image directory: %w", err)
	}
	b.clean.add("remove "+b.images, func() error { return os.RemoveAll(b.images) })
	if err := os.WriteFile(filepath.Join(b.work, imagesFile), []byte(b.images+"\n"), 0o644); err != nil {
		return err
	}
	fs := fsType(b.images)
	need := 7 * b.mode.driveBytes
	if free := freeBytes(b.images); free >= 0 && free < need {
		return fmt.Errorf("%s has %s free, the drives need about %s", b.images, bytesText(free), bytesText(need))
	}

	b.rep = &report.Report{
		Schema: report.SchemaVersion, Mode: b.mode.name, Command: command(), Started: time.Now(),
		Commit: commit, Dirty: dirty, Machine: machine(ctx),
		Config: report.Config{
			Reps: b.mode.reps, RuntimeS: b.mode.runtime.Seconds(), RampS: b.mode.ramp.Seconds(),
			ImageDir: imagesBase, ImageFS: fs, DriveBytes: b.mode.driveBytes, FileBytes: b.mode.fileBytes, IOEngine: ioengine,
		},
		Jobs:  report.Catalog,
		Notes: notes,
	}
	b.rep.Machine.LoadStart = loadavg()
	if fs != "tmpfs" {
		b.rep.Notes = append(b.rep.Notes, fmt.Sprintf("The drives were on %s, not tmpfs.", fs))
	}
	for _, lp := range b.mode.plan {
		l, _ := levelInfo(lp.level)
		var peers []report.Peer
		for _, p := range l.Peers {
			if b.mode.uses(l.ID, p.ID) {
				peers = append(peers, p)
			}
		}
		l.Peers = peers
		b.rep.Levels = append(b.rep.Levels, l)
	}

	if err := b.setup(ctx); err != nil {
		return fmt.Errorf("setting up: %w", err)
	}
	if hold {
		return b.holdStacks(ctx)
	}
	if err := b.measureAll(ctx, steps); err != nil {
		return err
	}
	b.rep.Machine.LoadEnd = loadavg()
	b.rep.Seconds = time.Since(b.rep.Started).Seconds()
	if err := report.Write(out, b.rep); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "benchrun: report in %s\n", out)
	if defaultOut {
		if err := updateREADME(filepath.Join(b.repo, "README.md"), report.READMESection(b.rep, "docs/bench")); err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, "benchrun: README.md's benchmark section updated")
	}
	md, err := os.ReadFile(filepath.Join(out, report.MarkdownFile))
	if err != nil {
		return err
	}
	if b.mode.name == "smoke" {
		return checkSmoke(b.rep, md)
	}
	// The targets, on the terminal.
	if i := strings.Index(string(md), "## Targets"); i >= 0 {
		section := string(md[i:])
		if j := strings.Index(section[3:], "\n## "); j >= 0 {
			section = section[:j+3]
		}
		fmt.Println(section)
	}
	return nil
}

// measureAll runs the steps, with a line of progress each.
func (b *bench) measureAll(ctx context.Context, steps []step) error {
	start := time.Now()
	for i, s := range steps {
		run, err := b.measure(ctx, s)
		if err != nil {
			return err
		}
		run.Seq = i + 1
		b.rep.Runs = append(b.rep.Runs, run)
		done := i + 1
		eta := time.Duration(float64(time.Since(start)) / float64(done) * float64(len(steps)-done)).Round(time.Second)
		info, _ := peerInfo(s.level, s.peer)
		l, _ := levelInfo(s.level)
		fig := fmt.Sprintf("%.0f MB/s", run.BW/1e6)
		if s.job.BlockSize < 64<<10 {
			fig = fmt.Sprintf("%.1fk IOPS", run.IOPS/1e3)
		}
		fmt.Fprintf(os.Stderr, "[%4d/%d %3.0f%%] %s: %s on %s, repetition %d/%d: %s, %.0f µs mean · ETA %v\n",
			done, len(steps), 100*float64(done)/float64(len(steps)), l.Title, s.job.ID, info.Label, s.rep, b.mode.reps,
			fig, run.LatMeanNs/1e3, eta)
	}
	return nil
}

// holdStacks prints where each stack is and waits for a signal.
func (b *bench) holdStacks(ctx context.Context) error {
	keys := make([]string, 0, len(b.targets))
	for k := range b.targets {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		t := b.targets[k]
		where := t.file
		if t.uri != "" {
			where = t.uri
		}
		fmt.Printf("%-20s %s (%d bytes) pids %v\n", k, where, t.size, t.pids)
	}
	fmt.Printf("logs in %s; Ctrl-C takes everything down\n", filepath.Join(b.work, "logs"))
	<-ctx.Done()
	return nil
}

// teardown runs the cleanups, then the sweep: anything the sweep finds was left
// behind by a cleanup, an error. removeWork removes the work directory too (when
// this program made it; bench/run.sh removes its own).
func (b *bench) teardown(removeWork bool) []error {
	errs := b.clean.run(b.progressf)
	if b.work != "" {
		for _, f := range sweep(b.work) {
			errs = append(errs, fmt.Errorf("left behind: %s", f))
		}
		if removeWork {
			if err := os.RemoveAll(b.work); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errs
}

// checkSmoke fails unless the smoke run produced a figure for every step and a report
// with its targets.
func checkSmoke(r *report.Report, md []byte) error {
	for _, run := range r.Runs {
		if run.BW <= 0 || run.LatMeanNs <= 0 {
			return fmt.Errorf("smoke: %s %s on %s has no figures", run.Level, run.Job, run.Peer)
		}
	}
	if !strings.Contains(string(md), "## Targets") {
		return fmt.Errorf("smoke: the report has no targets")
	}
	fmt.Fprintf(os.Stderr, "benchrun: smoke run passed: %d runs\n", len(r.Runs))
	return nil
}

func repoRoot() (string, error) {
	out, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		return "", fmt.Errorf("not in the atrest repository (git rev-parse): %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// command is how this run was started: BENCH_PROGRAM (bench/run.sh, which sets it)
// and the flags, less the work directory and the notes (the report shows those).
func command() string {
	prog := os.Getenv("BENCH_PROGRAM")
	if prog == "" {
		prog = "benchrun"
	}
	words := []string{prog}
	args := os.Args[1:]
	for i := 0; i < len(args); i++ {
		name := strings.TrimLeft(args[i], "-")
		name, _, hasValue := strings.Cut(name, "=")
		if name == "work" || name == "note" {
			if !hasValue {
				i++
			}
			continue
		}
		words = append(words, args[i])
	}
	return strings.Join(words, " ")
}

func (b *bench) progressf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "benchrun [%3.0fs]: "+format+"\n", append([]any{time.Since(b.started).Seconds()}, args...)...)
}
