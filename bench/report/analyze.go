package report

import (
	"math"
	"slices"
)

// MinReps is the number of repetitions a ratio needs to count for a target (issue 15:
// every ratio is the median of at least 5 interleaved repetitions).
const MinReps = 5

// Summary is what Analyze computes from a report's runs.
type Summary struct {
	Cells       []Cell         `json:"cells"`
	Comparisons []Comparison   `json:"comparisons"`
	Targets     []TargetResult `json:"targets"`
	Ladder      []Rung         `json:"ladder,omitempty"`
	Hops        []Hop          `json:"hops,omitempty"`
	Load        Load           `json:"load"`
}

// Cell is the medians of one job on one peer over the repetitions.
type Cell struct {
	Level     string  `json:"level"`
	Job       string  `json:"job"`
	Peer      string  `json:"peer"`
	N         int     `json:"n"`
	BW        float64 `json:"bw_bytes"`
	IOPS      float64 `json:"iops"`
	LatMeanNs float64 `json:"lat_mean_ns"`
	LatP99Ns  float64 `json:"lat_p99_ns"`
	// CPUPerIOus is the peer's user-space CPU time per request in microseconds (0 for
	// kernel peers). It counts the ramp, so it assumes the ramp ran at the same rate.
	CPUPerIOus float64 `json:"cpu_per_io_us,omitempty"`
}

// Metrics a comparison can be about.
const (
	Throughput = "throughput"
	LatMean    = "lat_mean"
	LatP99     = "lat_p99"
)

// Comparison is the ratio Num/Den of a metric of one job at one level, computed per
// repetition from runs made one after the other: Median, Min and Max of those ratios.
type Comparison struct {
	Level  string  `json:"level"`
	Job    string  `json:"job"`
	Num    string  `json:"num"`
	Den    string  `json:"den"`
	Metric string  `json:"metric"`
	N      int     `json:"n"`
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
}

// TargetResult is one target of DESIGN §8 / issue 15 against what the run measured.
type TargetResult struct {
	Name    string  `json:"name"`
	Job     string  `json:"job,omitempty"`
	Goal    float64 `json:"goal"`
	AtLeast bool    `json:"at_least"` // the ratio must be >= Goal (else <= Goal)
	N       int     `json:"n"`
	Median  float64 `json:"median"`
	Min     float64 `json:"min"`
	Max     float64 `json:"max"`
	// Status is "pass", "fail", "not measured", or "too few reps" (a ratio of fewer
	// than MinReps repetitions: shown, not judged).
	Status string `json:"status"`
	// Unsettled is set when the spread of the ratios crosses the goal: some
	// repetitions passed and some failed, and the median decides by a small margin of
	// what the machine's noise allows.
	Unsettled bool `json:"unsettled,omitempty"`
}

// Rung is one stack of the latency ladder: single-stream mean latency at each level.
type Rung struct {
	Level     string  `json:"level"`
	Peer      string  `json:"peer"`
	Label     string  `json:"label"`
	Job       string  `json:"job"`
	LatMeanNs float64 `json:"lat_mean_ns"`
}

// Hop is the share of one hop in the single-stream latency of `atrest mount` ext4: the
// difference of the medians of two stacks that differ by that hop alone.
type Hop struct {
	Name   string  `json:"name"`
	Job    string  `json:"job"`
	Micros float64 `json:"us"`
}

// Load is how busy the machine was during the runs.
type Load struct {
	Load1Mean float64 `json:"load1_mean"`
	Load1Max  float64 `json:"load1_max"`
	BusyMean  float64 `json:"busy_cpus_mean"`
	BusyMax   float64 `json:"busy_cpus_max"`
}

// comparisonDef is a pair of peers worth a ratio; label names it where the peers'
// IDs would not say enough (the scaling ratios).
type comparisonDef struct {
	level, num, den string
	label           string
}

// comparisons are the ratios the report shows, for every job both peers ran.
var comparisons = []comparisonDef{
	{"nbd", "atrest", "plain", ""},
	{"nbd", "atrest", "nbdkit", ""},
	{"nbd", "atrest", "nbdkit-luks", ""},
	{"nbd", "plain", "nbdkit", ""},
	{"fuse", "atrest", "plain", ""},
	{"fuse", "atrest", "nbdfuse", ""},
	{"fuse", "atrest-nolog", "atrest", ""},
	{"ext4", "atrest", "plain", ""},
	{"ext4", "atrest", "kernel", ""},
	{"ext4", "plain", "kernel", ""},
	// Scaling: two jobs (connections) against one, and GOMAXPROCS 2 against 1.
	{"nbd", "atrest-2j", "atrest", "atrest: 2 jobs / 1"},
	{"nbd", "atrest-gmp1-2j", "atrest-gmp1", "atrest with GOMAXPROCS=1: 2 jobs / 1"},
	{"nbd", "plain-2j", "plain", "unencrypted: 2 jobs / 1"},
	{"nbd", "nbdkit-2j", "nbdkit", "nbdkit: 2 jobs / 1"},
	{"nbd", "atrest", "atrest-gmp1", "atrest, 1 job: GOMAXPROCS 2 / 1"},
	{"nbd", "atrest-2j", "atrest-gmp1-2j", "atrest, 2 jobs: GOMAXPROCS 2 / 1"},
}

// targetDef is one target: the ratio num/den of a metric, for each of the jobs.
type targetDef struct {
	name            string
	level, num, den string
	jobs            []string
	metric          string
	atLeast         bool
	goal            float64
}

// targets are DESIGN §8's and issue 15's, in the order the report lists them.
var targets = []targetDef{
	{"ext4, single-stream write: encrypted / unencrypted throughput", "ext4", "atrest", "plain",
		[]string{"seqwrite-1m-qd1", "randwrite-4k-qd1"}, Throughput, true, 0.95},
	{"ext4, single-stream read: encrypted / unencrypted throughput", "ext4", "atrest", "plain",
		[]string{"seqread-1m-qd1", "randread-4k-qd1"}, Throughput, true, 0.98},
	{"ext4, single-stream write: encrypted / unencrypted mean latency", "ext4", "atrest", "plain",
		[]string{"seqwrite-1m-qd1", "randwrite-4k-qd1"}, LatMean, false, 1.05},
	{"ext4, single-stream read: encrypted / unencrypted mean latency", "ext4", "atrest", "plain",
		[]string{"seqread-1m-qd1", "randread-4k-qd1"}, LatMean, false, 1.02},
	{"NBD, 1 MiB depth 8 write: encrypted / unencrypted", "nbd", "atrest", "plain",
		[]string{"seqwrite-1m-qd8"}, Throughput, true, 0.95},
	{"NBD, 1 MiB depth 8 read: encrypted / unencrypted", "nbd", "atrest", "plain",
		[]string{"seqread-1m-qd8"}, Throughput, true, 0.97},
	{"NBD, 1 MiB depth 8: encrypted / nbdkit plaintext", "nbd", "atrest", "nbdkit",
		[]string{"seqread-1m-qd8", "seqwrite-1m-qd8"}, Throughput, true, 1},
	{"NBD, 1 MiB depth 8: encrypted / nbdkit+luks", "nbd", "atrest", "nbdkit-luks",
		[]string{"seqread-1m-qd8", "seqwrite-1m-qd8"}, Throughput, true, 2.5},
	{"NBD, 4 KiB random depth 32: encrypted / nbdkit plaintext", "nbd", "atrest", "nbdkit",
		[]string{"randread-4k-qd32", "randwrite-4k-qd32"}, Throughput, true, 1},
	{"FUSE file: atrest / nbdfuse on the same export", "fuse", "atrest", "nbdfuse",
		[]string{"seqread-1m-qd1", "seqwrite-1m-qd1", "randread-4k-qd1", "randwrite-4k-qd1",
			"seqread-1m-qd8", "seqwrite-1m-qd8", "randread-4k-qd32", "randwrite-4k-qd32"}, Throughput, true, 1},
	{"userspace hops, 1 MiB single-stream: atrest mount / kernel ext4 on loop", "ext4", "atrest", "kernel",
		[]string{"seqread-1m-qd1", "seqwrite-1m-qd1"}, Throughput, true, 0.4},
	{"userspace hops, 4 KiB single-stream: atrest mount / kernel ext4 on loop, mean latency", "ext4", "atrest", "kernel",
		[]string{"randread-4k-qd1", "randwrite-4k-qd1"}, LatMean, false, 2.5},
}

// xtsTargets are DESIGN §8's cipher targets: atrest's XTS against OpenSSL's per core.
var xtsTargets = []struct {
	size int
	goal float64
}{{4096, 1.4}, {512, 1.0}}

// rungs are the stacks of the latency ladder, from the bare drive up.
var rungs = []struct{ level, peer, label string }{
	{"drive", "file", "drive: fio on the image file (O_DIRECT)"},
	{"nbd", "plain", "NBD: libnbd → socket → server → drive"},
	{"nbd", "atrest", "NBD, encrypted: … → server → XTS → drive"},
	{"fuse", "fusefs-file", "FUSE: kernel FUSE → fusefs → drive (no NBD)"},
	{"fuse", "plain", "FUSE file: FUSE → NBD client → socket → server → drive"},
	{"fuse", "atrest", "FUSE file, encrypted"},
	{"ext4", "kernel", "ext4 → loop → drive (kernel only)"},
	{"ext4", "plain", "ext4 → loop → FUSE → NBD → server → drive"},
	{"ext4", "atrest", "ext4 via atrest mount, encrypted"},
}

// ladderJobs are the single-stream jobs of the ladder and the hop breakdown.
var ladderJobs = []string{"randread-4k-qd1", "randwrite-4k-qd1", "seqread-1m-qd1", "seqwrite-1m-qd1"}

// hops splits the latency of ext4 via atrest mount into its hops: each is the
// difference between two rungs (level/peer) that differ by that hop.
var hops = []struct {
	name     string
	top, bot [2]string // rungs; an empty bot is zero
}{
	{"drive (tmpfs)", [2]string{"drive", "file"}, [2]string{}},
	{"kernel FUSE + fusefs", [2]string{"fuse", "fusefs-file"}, [2]string{"drive", "file"}},
	{"NBD client + socket + server", [2]string{"fuse", "plain"}, [2]string{"fuse", "fusefs-file"}},
	{"loop + ext4 over the FUSE file", [2]string{"ext4", "plain"}, [2]string{"fuse", "plain"}},
	{"XTS (encryption and what it adds)", [2]string{"ext4", "atrest"}, [2]string{"ext4", "plain"}},
}

type runKey struct {
	level, job, peer string
	rep              int
}

// Analyze computes the medians, the ratios and the targets from the runs.
func Analyze(r *Report) *Summary {
	s := &Summary{}
	byKey := map[runKey]Run{}
	type cellKey struct{ level, job, peer string }
	var order []cellKey
	groups := map[cellKey][]Run{}
	for _, run := range r.Runs {
		byKey[runKey{run.Level, run.Job, run.Peer, run.Rep}] = run
		k := cellKey{run.Level, run.Job, run.Peer}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], run)
	}
	dur := r.Config.RuntimeS + r.Config.RampS
	for _, k := range order {
		runs := groups[k]
		c := Cell{Level: k.level, Job: k.job, Peer: k.peer, N: len(runs)}
		c.BW = median(runs, func(x Run) float64 { return x.BW })
		c.IOPS = median(runs, func(x Run) float64 { return x.IOPS })
		c.LatMeanNs = median(runs, func(x Run) float64 { return x.LatMeanNs })
		c.LatP99Ns = median(runs, func(x Run) float64 { return x.LatP99Ns })
		if dur > 0 {
			c.CPUPerIOus = median(runs, func(x Run) float64 {
				if x.IOPS == 0 {
					return 0
				}
				return x.StackCPU / (x.IOPS * dur) * 1e6
			})
		}
		s.Cells = append(s.Cells, c)
	}

	for _, def := range comparisons {
		for _, j := range r.Jobs {
			metrics := []string{Throughput}
			if j.Single() {
				metrics = append(metrics, LatMean, LatP99)
			}
			for _, m := range metrics {
				if c, ok := compare(r, byKey, def.level, j.ID, def.num, def.den, m); ok {
					s.Comparisons = append(s.Comparisons, c)
				}
			}
		}
	}

	for _, t := range targets {
		for _, job := range t.jobs {
			tr := TargetResult{Name: t.name, Job: job, Goal: t.goal, AtLeast: t.atLeast, Status: "not measured"}
			if c, ok := s.comparison(t.level, job, t.num, t.den, t.metric); ok {
				tr.N, tr.Median, tr.Min, tr.Max = c.N, c.Median, c.Min, c.Max
				tr.Status = judge(c.Median, t.goal, t.atLeast)
				tr.Unsettled = c.Min < t.goal && c.Max > t.goal
				if c.N < MinReps {
					tr.Status = "too few reps"
				}
			}
			s.Targets = append(s.Targets, tr)
		}
	}
	s.Targets = append(s.Targets, xtsResults(r)...)

	for _, job := range ladderJobs {
		for _, g := range rungs {
			if c, ok := s.cell(g.level, job, g.peer); ok {
				s.Ladder = append(s.Ladder, Rung{Level: g.level, Peer: g.peer, Label: g.label, Job: job, LatMeanNs: c.LatMeanNs})
			}
		}
		for _, h := range hops {
			top, ok1 := s.cell(h.top[0], job, h.top[1])
			var bot Cell
			ok2 := true
			if h.bot[0] != "" {
				bot, ok2 = s.cell(h.bot[0], job, h.bot[1])
			}
			if ok1 && ok2 {
				s.Hops = append(s.Hops, Hop{Name: h.name, Job: job, Micros: (top.LatMeanNs - bot.LatMeanNs) / 1e3})
			}
		}
	}

	if len(r.Runs) > 0 {
		for _, run := range r.Runs {
			s.Load.Load1Mean += run.Load1
			s.Load.BusyMean += run.BusyCPUs
			s.Load.Load1Max = math.Max(s.Load.Load1Max, run.Load1)
			s.Load.BusyMax = math.Max(s.Load.BusyMax, run.BusyCPUs)
		}
		s.Load.Load1Mean /= float64(len(r.Runs))
		s.Load.BusyMean /= float64(len(r.Runs))
	}
	return s
}

// compare computes the per-repetition ratios num/den of metric m.
func compare(r *Report, runs map[runKey]Run, level, job, num, den, m string) (Comparison, bool) {
	var ratios []float64
	for rep := 1; rep <= r.Config.Reps; rep++ {
		a, ok1 := runs[runKey{level, job, num, rep}]
		b, ok2 := runs[runKey{level, job, den, rep}]
		if !ok1 || !ok2 {
			continue
		}
		x, y := metric(a, m), metric(b, m)
		if y > 0 && x > 0 {
			ratios = append(ratios, x/y)
		}
	}
	if len(ratios) == 0 {
		return Comparison{}, false
	}
	slices.Sort(ratios)
	return Comparison{Level: level, Job: job, Num: num, Den: den, Metric: m, N: len(ratios),
		Median: medianSorted(ratios), Min: ratios[0], Max: ratios[len(ratios)-1]}, true
}

func metric(run Run, m string) float64 {
	switch m {
	case LatMean:
		return run.LatMeanNs
	case LatP99:
		return run.LatP99Ns
	}
	return run.BW
}

func judge(v, goal float64, atLeast bool) string {
	if (atLeast && v >= goal) || (!atLeast && v <= goal) {
		return "pass"
	}
	return "fail"
}

// xtsResults judges atrest's XTS (the implementation it uses here) against OpenSSL.
func xtsResults(r *Report) []TargetResult {
	var out []TargetResult
	for _, t := range xtsTargets {
		for _, op := range []string{"encrypt", "decrypt"} {
			tr := TargetResult{Name: "XTS per core: atrest / OpenSSL, " + op + " " + sizeText(t.size),
				Goal: t.goal, AtLeast: true, Status: "not measured"}
			a, ok1 := r.speed(r.SpeedImpl, op, t.size)
			o, ok2 := r.speed("openssl", op, t.size)
			if ok1 && ok2 && o > 0 {
				tr.N = 1
				tr.Median = a / o
				tr.Min, tr.Max = tr.Median, tr.Median
				tr.Status = judge(tr.Median, t.goal, true)
			}
			out = append(out, tr)
		}
	}
	return out
}

func (r *Report) speed(impl, op string, size int) (float64, bool) {
	for _, s := range r.Speed {
		if s.Impl == impl && s.Op == op && s.Size == size {
			return s.GBps, true
		}
	}
	return 0, false
}

// speedAxes are the sizes and the implementations of the XTS speeds, in the order
// `atrest speed` measured them.
func (r *Report) speedAxes() (sizes []int, impls []string) {
	for _, x := range r.Speed {
		if !slices.Contains(sizes, x.Size) {
			sizes = append(sizes, x.Size)
		}
		if !slices.Contains(impls, x.Impl) {
			impls = append(impls, x.Impl)
		}
	}
	return sizes, impls
}

func (s *Summary) cell(level, job, peer string) (Cell, bool) {
	for _, c := range s.Cells {
		if c.Level == level && c.Job == job && c.Peer == peer {
			return c, true
		}
	}
	return Cell{}, false
}

func (s *Summary) comparison(level, job, num, den, m string) (Comparison, bool) {
	for _, c := range s.Comparisons {
		if c.Level == level && c.Job == job && c.Num == num && c.Den == den && c.Metric == m {
			return c, true
		}
	}
	return Comparison{}, false
}

func median(runs []Run, f func(Run) float64) float64 {
	v := make([]float64, len(runs))
	for i, r := range runs {
		v[i] = f(r)
	}
	slices.Sort(v)
	return medianSorted(v)
}

func medianSorted(v []float64) float64 {
	n := len(v)
	switch {
	case n == 0:
		return 0
	case n%2 == 1:
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}
