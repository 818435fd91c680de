package report

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"
)

// Markdown writes the report in Markdown: how it was made, the targets, the charts
// (those of charts, which Charts drew: PNG files next to it), then every level's
// tables.
func Markdown(w io.Writer, r *Report, s *Summary, charts map[string][]byte) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# Benchmark report\n\n")
	b.WriteString(provenance(r, s))
	b.WriteString("\n")

	b.WriteString("## Targets\n\n")
	b.WriteString("The targets of DESIGN §8 and issue 15. Each is a ratio of two peers measured in the same run,\n")
	fmt.Fprintf(&b, "the median of the per-repetition ratios (at least %d repetitions to count), with their spread.\n\n", MinReps)
	b.WriteString(TargetsTable(s))
	b.WriteString("\n")

	b.WriteString("## Charts\n\n")
	for _, c := range chartList {
		if _, ok := charts[c.file]; ok {
			fmt.Fprintf(&b, "![%s](%s)\n\n", c.title, c.file)
		}
	}

	for _, l := range r.Levels {
		b.WriteString(levelSection(r, s, l))
	}
	b.WriteString(ladderSection(r, s))
	b.WriteString(scalingSection(r, s))
	b.WriteString(xtsSection(r))
	_, err := io.WriteString(w, b.String())
	return err
}

// provenance says how, where and when the figures were made.
func provenance(r *Report, s *Summary) string {
	var b strings.Builder
	commit := r.Commit
	if len(commit) > 12 {
		commit = commit[:12]
	}
	fmt.Fprintf(&b, "Produced by `%s` (%s mode) on commit `%s`, %s; the run took %s.\n",
		r.Command, r.Mode, commit, r.Started.UTC().Format("2006-01-02 15:04 MST"),
		(time.Duration(r.Seconds) * time.Second).String())
	if r.Dirty {
		b.WriteString("**The tree had uncommitted changes: these figures are not those of the commit named.**\n")
	}
	m := r.Machine
	fmt.Fprintf(&b, "\nMachine: %s, %d cores, %.0f GiB, Linux %s, %s", m.CPU, m.Cores, m.MemoryGiB, m.Kernel, m.Go)
	for _, k := range slices.Sorted(maps.Keys(m.Tools)) {
		fmt.Fprintf(&b, "; %s %s", k, m.Tools[k])
	}
	b.WriteString(".\n")
	fmt.Fprintf(&b, "Load: one-minute load average %.1f before the run, %.1f on average over the runs (max %.1f), %.1f after; "+
		"the machine kept %.1f of its %d CPUs busy on average during the runs (max %.1f), fio and the stacks included.\n",
		m.LoadStart[0], s.Load.Load1Mean, s.Load.Load1Max, m.LoadEnd[0], s.Load.BusyMean, m.Cores, s.Load.BusyMax)
	c := r.Config
	fmt.Fprintf(&b, "\nDrives: image files in %s (%s), %s each; the fio file in ext4 is %s. "+
		"Each fio run measures %s after a ramp of %s; %d repetitions; "+
		"within a job the peers take turns, their order rotated from one repetition to the next. "+
		"fio uses ioengine=nbd on NBD exports and %s with direct I/O on files.\n",
		c.ImageDir, c.ImageFS, bytesText(c.DriveBytes), bytesText(c.FileBytes),
		secondsText(c.RuntimeS), secondsText(c.RampS), c.Reps, c.IOEngine)
	if c.Reps < MinReps {
		fmt.Fprintf(&b, "\n**Only %d repetition(s): the ratios are shown but not judged (the targets need %d).**\n", c.Reps, MinReps)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "\nNote: %s\n", n)
	}
	return b.String()
}

// TargetsTable is the Markdown table of the targets with their results.
func TargetsTable(s *Summary) string {
	var b strings.Builder
	b.WriteString("| target | job | measured | spread | goal | result |\n|---|---|---|---|---|---|\n")
	for _, t := range s.Targets {
		op := "≥"
		if !t.AtLeast {
			op = "≤"
		}
		measured, spread := "–", "–"
		if t.N > 0 {
			measured = ratioText(t.Median)
			if t.N > 1 {
				spread = fmt.Sprintf("%.2f–%.2f (n=%d)", t.Min, t.Max, t.N)
			}
		}
		result := t.Status
		switch t.Status {
		case "pass":
			result = "**pass**"
		case "fail":
			result = "**FAIL**"
		}
		if t.Unsettled {
			result += " (the spread crosses the goal)"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s %.2fx | %s |\n", t.Name, jobTitle(t.Job), measured, spread, op, t.Goal, result)
	}
	return b.String()
}

func levelSection(r *Report, s *Summary, l Level) string {
	var peers []Peer
	for _, p := range l.Peers {
		if !p.Scaling() {
			peers = append(peers, p)
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## %s\n\n%s\n\n", l.Title, l.Description)
	for _, p := range peers {
		fmt.Fprintf(&b, "- **%s** (`%s`): %s\n", p.Label, p.ID, p.Description)
	}
	b.WriteString("\n")
	var comps []comparisonDef
	for _, c := range comparisons {
		_, ok1 := l.peer(c.num)
		_, ok2 := l.peer(c.den)
		if c.level == l.ID && ok1 && ok2 && !isScaling(l, c.num) && !isScaling(l, c.den) {
			comps = append(comps, c)
		}
	}

	// Throughput: medians, then the ratios with their spread.
	b.WriteString("Throughput (median):\n\n| job |")
	for _, p := range peers {
		fmt.Fprintf(&b, " %s |", p.Label)
	}
	for _, c := range comps {
		fmt.Fprintf(&b, " %s |", ratioHeader(c))
	}
	b.WriteString("\n|---|" + strings.Repeat("---|", len(peers)+len(comps)) + "\n")
	for _, j := range r.Jobs {
		row, found := rowFor(s, l, j, peers, func(c Cell) string { return throughputText(j, c) })
		if !found {
			continue
		}
		b.WriteString(row)
		for _, c := range comps {
			b.WriteString(" " + comparisonText(s, l.ID, j.ID, c, Throughput) + " |")
		}
		b.WriteString("\n")
	}

	// Single-stream latency: mean and p99 of each peer, then the ratios.
	b.WriteString("\nSingle-stream latency from submission to completion (fio's lat), mean / p99 (median, µs):\n\n| job |")
	for _, p := range peers {
		fmt.Fprintf(&b, " %s |", p.Label)
	}
	for _, c := range comps {
		fmt.Fprintf(&b, " %s mean, p99 |", ratioHeader(c))
	}
	b.WriteString("\n|---|" + strings.Repeat("---|", len(peers)+len(comps)) + "\n")
	for _, j := range r.Jobs {
		if !j.Single() {
			continue
		}
		row, found := rowFor(s, l, j, peers, func(c Cell) string {
			return fmt.Sprintf("%s / %s", microsText(c.LatMeanNs), microsText(c.LatP99Ns))
		})
		if !found {
			continue
		}
		b.WriteString(row)
		for _, c := range comps {
			b.WriteString(" " + comparisonText(s, l.ID, j.ID, c, LatMean) + ", " + comparisonText(s, l.ID, j.ID, c, LatP99) + " |")
		}
		b.WriteString("\n")
	}

	// CPU of the user-space processes per request, where there are any.
	var cpuPeers []Peer
	for _, p := range peers {
		for _, c := range s.Cells {
			if c.Level == l.ID && c.Peer == p.ID && c.CPUPerIOus > 0 {
				cpuPeers = append(cpuPeers, p)
				break
			}
		}
	}
	if len(cpuPeers) > 0 {
		b.WriteString("\nCPU time of the user-space processes of the stack (servers, FUSE daemons; not fio, not the kernel's own threads) per request (median, µs):\n\n| job |")
		for _, p := range cpuPeers {
			fmt.Fprintf(&b, " %s |", p.Label)
		}
		b.WriteString("\n|---|" + strings.Repeat("---|", len(cpuPeers)) + "\n")
		for _, j := range r.Jobs {
			row, found := rowFor(s, l, j, cpuPeers, func(c Cell) string {
				if c.CPUPerIOus == 0 {
					return "–"
				}
				return microsText(c.CPUPerIOus * 1e3)
			})
			if found {
				b.WriteString(row + "\n")
			}
		}
	}
	b.WriteString("\n")
	return b.String()
}

// rowFor starts a table row for job j with one cell per peer; found reports whether
// any peer ran the job.
func rowFor(s *Summary, l Level, j Job, peers []Peer, f func(Cell) string) (row string, found bool) {
	var b strings.Builder
	fmt.Fprintf(&b, "| %s |", j.Title())
	for _, p := range peers {
		c, ok := s.cell(l.ID, j.ID, p.ID)
		if !ok {
			b.WriteString(" – |")
			continue
		}
		found = true
		fmt.Fprintf(&b, " %s |", f(c))
	}
	return b.String(), found
}

func isScaling(l Level, id string) bool {
	p, ok := l.peer(id)
	return ok && p.Scaling()
}

// ratioHeader names a ratio by its label, or by the IDs of its peers (which the
// level's list of peers gives beside their labels).
func ratioHeader(c comparisonDef) string {
	if c.label != "" {
		return c.label
	}
	return c.num + " / " + c.den
}

func comparisonText(s *Summary, level, job string, c comparisonDef, m string) string {
	x, ok := s.comparison(level, job, c.num, c.den, m)
	if !ok {
		return "–"
	}
	if x.N < 2 {
		return ratioText(x.Median)
	}
	return fmt.Sprintf("%s (%.2f–%.2f)", ratioText(x.Median), x.Min, x.Max)
}

func ladderSection(r *Report, s *Summary) string {
	if len(s.Ladder) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("## Where the time goes: single-stream latency, hop by hop\n\n")
	b.WriteString("Mean latency of one request at depth 1, submission to completion (median, µs), each stack on the same kind of drive, " +
		"from the bare drive up to ext4 via `atrest mount`:\n\n| stack |")
	for _, j := range ladderJobs {
		fmt.Fprintf(&b, " %s |", jobTitle(j))
	}
	b.WriteString("\n|---|" + strings.Repeat("---|", len(ladderJobs)) + "\n")
	for _, g := range rungs {
		var row strings.Builder
		found := false
		fmt.Fprintf(&row, "| %s |", g.label)
		for _, j := range ladderJobs {
			if c, ok := s.cell(g.level, j, g.peer); ok {
				found = true
				fmt.Fprintf(&row, " %s |", microsText(c.LatMeanNs))
			} else {
				row.WriteString(" – |")
			}
		}
		if found {
			b.WriteString(row.String() + "\n")
		}
	}
	if len(s.Hops) > 0 {
		b.WriteString("\nThe latency of ext4 via `atrest mount` (encrypted), split into hops: each hop is the difference " +
			"between the medians of two stacks above that differ by that hop alone (a first-order split: the hops " +
			"also compete for the same two cores; a negative figure is noise):\n\n| hop |")
		for _, j := range ladderJobs {
			fmt.Fprintf(&b, " %s |", jobTitle(j))
		}
		b.WriteString("\n|---|" + strings.Repeat("---|", len(ladderJobs)) + "\n")
		for _, h := range hops {
			fmt.Fprintf(&b, "| %s |", h.name)
			for _, j := range ladderJobs {
				v := "–"
				for _, x := range s.Hops {
					if x.Name == h.name && x.Job == j {
						v = fmt.Sprintf("%.1f", x.Micros)
					}
				}
				fmt.Fprintf(&b, " %s |", v)
			}
			b.WriteString("\n")
		}
	}
	b.WriteString("\n")
	return b.String()
}

func scalingSection(r *Report, s *Summary) string {
	l := r.level("nbd")
	if l == nil {
		return ""
	}
	var peers []Peer
	for _, p := range l.Peers {
		if p.Scaling() {
			peers = append(peers, p)
		}
	}
	if len(peers) == 0 {
		return ""
	}
	// The one-job peers the scaling peers are compared with come first.
	base := map[string]bool{}
	var comps []comparisonDef
	for _, c := range comparisons {
		if c.level == "nbd" && (isScaling(*l, c.num) || isScaling(*l, c.den)) {
			comps = append(comps, c)
			base[c.num], base[c.den] = true, true
		}
	}
	var cols []Peer
	for _, p := range l.Peers {
		if base[p.ID] {
			cols = append(cols, p)
		}
	}
	var b strings.Builder
	b.WriteString("## Scaling: connections and GOMAXPROCS\n\n")
	b.WriteString("At the NBD level: fio with two jobs (two NBD connections, each on its own half of the export) " +
		"against one, and the atrest server with GOMAXPROCS=1 against the default (one per core):\n\n")
	for _, p := range peers {
		fmt.Fprintf(&b, "- **%s** (`%s`): %s\n", p.Label, p.ID, p.Description)
	}
	b.WriteString("\nThroughput (median), then ratios:\n\n| job |")
	for _, p := range cols {
		fmt.Fprintf(&b, " %s |", p.Label)
	}
	for _, c := range comps {
		fmt.Fprintf(&b, " %s |", ratioHeader(c))
	}
	b.WriteString("\n|---|" + strings.Repeat("---|", len(cols)+len(comps)) + "\n")
	for _, j := range r.Jobs {
		found := false
		for _, p := range peers {
			if _, ok := s.cell("nbd", j.ID, p.ID); ok {
				found = true
			}
		}
		if !found {
			continue
		}
		row, _ := rowFor(s, *l, j, cols, func(c Cell) string { return throughputText(j, c) })
		b.WriteString(row)
		for _, c := range comps {
			b.WriteString(" " + comparisonText(s, "nbd", j.ID, c, Throughput) + " |")
		}
		b.WriteString("\n")
	}
	b.WriteString("\n")
	return b.String()
}

func xtsSection(r *Report) string {
	if len(r.Speed) == 0 {
		return ""
	}
	sizes, impls := r.speedAxes()
	var b strings.Builder
	b.WriteString("## XTS-AES-256 per core\n\n")
	fmt.Fprintf(&b, "`atrest speed --json`: GB/s (10^9 bytes/s) on one core, by CPU time, with the ratio to OpenSSL "+
		"(`openssl speed -evp aes-256-xts`) at the same size. atrest uses %s on this CPU.\n\n| implementation | op |", r.SpeedImpl)
	for _, sz := range sizes {
		fmt.Fprintf(&b, " %s |", sizeText(sz))
	}
	b.WriteString("\n|---|---|" + strings.Repeat("---|", len(sizes)) + "\n")
	for _, impl := range impls {
		for _, op := range []string{"encrypt", "decrypt"} {
			var row strings.Builder
			found := false
			fmt.Fprintf(&row, "| %s | %s |", impl, op)
			for _, sz := range sizes {
				v, ok := r.speed(impl, op, sz)
				if !ok {
					row.WriteString(" – |")
					continue
				}
				found = true
				cell := fmt.Sprintf("%.2f", v)
				if o, ok := r.speed("openssl", op, sz); ok && impl != "openssl" && o > 0 {
					cell += fmt.Sprintf(" (%.2fx)", v/o)
				}
				fmt.Fprintf(&row, " %s |", cell)
			}
			if found {
				b.WriteString(row.String() + "\n")
			}
		}
	}
	b.WriteString("\n")
	return b.String()
}

// throughputText is MB/s for large blocks, IOPS for small ones.
func throughputText(j Job, c Cell) string {
	if j.BlockSize >= 64<<10 {
		return fmt.Sprintf("%.0f MB/s", c.BW/1e6)
	}
	return fmt.Sprintf("%.1fk IOPS", c.IOPS/1e3)
}

func microsText(ns float64) string {
	us := ns / 1e3
	if us >= 100 {
		return fmt.Sprintf("%.0f", us)
	}
	return fmt.Sprintf("%.1f", us)
}

func ratioText(v float64) string { return fmt.Sprintf("%.2fx", v) }

func jobTitle(id string) string {
	if j, ok := CatalogJob(id); ok {
		return j.Title()
	}
	return id
}

func bytesText(n int64) string {
	if n <= 0 {
		return "–"
	}
	return sizeText(int(n))
}

func secondsText(s float64) string {
	return fmt.Sprintf("%g s", s)
}
