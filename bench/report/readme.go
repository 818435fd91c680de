package report

import (
	"fmt"
	"path"
	"strings"
)

// READMESection is what the README shows of a report: how it was made, the chart of
// the cost of encryption, the targets, and a link to the whole report. dir is the
// report's directory relative to the README.
func READMESection(r *Report, dir string) string {
	s := Analyze(r)
	var b strings.Builder
	commit := r.Commit
	if len(commit) > 12 {
		commit = commit[:12]
	}
	fmt.Fprintf(&b, "The last committed run of `%s` (%s mode; %s, %d cores, Linux %s; commit `%s`, %s), "+
		"drives in %s, peers interleaved, %d repetitions. The whole report, with every level's figures, "+
		"the latency of each hop, scaling and the XTS speed, is [%s](%s); the figures are in [%s](%s).\n\n",
		r.Command, r.Mode, r.Machine.CPU, r.Machine.Cores, r.Machine.Kernel, commit,
		r.Started.UTC().Format("2006-01-02"), r.Config.ImageFS, r.Config.Reps,
		path.Join(dir, MarkdownFile), path.Join(dir, MarkdownFile), path.Join(dir, JSONFile), path.Join(dir, JSONFile))
	if r.Dirty {
		b.WriteString("**That run was made on a tree with uncommitted changes.**\n\n")
	}
	fmt.Fprintf(&b, "Load during the run: one-minute load average %.1f on average (max %.1f) on %d cores.\n\n",
		s.Load.Load1Mean, s.Load.Load1Max, r.Machine.Cores)
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "Note: %s\n\n", n)
	}
	fmt.Fprintf(&b, "![%s](%s)\n\n", chartList[0].title, path.Join(dir, chartList[0].file))
	b.WriteString(TargetsTable(s))
	return b.String()
}
