package report

import (
	"bytes"
	"flag"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/report.golden.md from testdata/fixture.json")

// TestWriteFixture writes the report of a real run twice (testdata/fixture.json: a
// full run on a loaded machine, cut to three jobs with jq to keep it small): the
// Markdown must match the golden file, every chart must be a PNG, and the two writes
// must give the same bytes.
func TestWriteFixture(t *testing.T) {
	r, err := Read("testdata/fixture.json")
	if err != nil {
		t.Fatal(err)
	}
	dirs := []string{t.TempDir(), t.TempDir()}
	for _, d := range dirs {
		if err := Write(d, r); err != nil {
			t.Fatal(err)
		}
	}
	md, err := os.ReadFile(filepath.Join(dirs[0], MarkdownFile))
	if err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "report.golden.md")
	if *update {
		if err := os.WriteFile(golden, md, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(md, want) {
		t.Errorf("report.md differs from %s (go test -run TestWriteFixture -update rewrites it):\n%s", golden, md)
	}

	for _, c := range chartList {
		a, err := os.ReadFile(filepath.Join(dirs[0], c.file))
		if err != nil {
			t.Errorf("chart %s: %v", c.file, err)
			continue
		}
		img, err := png.Decode(bytes.NewReader(a))
		if err != nil {
			t.Errorf("chart %s is not a PNG: %v", c.file, err)
			continue
		}
		if b := img.Bounds(); b.Dx() < 400 || b.Dy() < 200 {
			t.Errorf("chart %s is %dx%d", c.file, b.Dx(), b.Dy())
		}
		if !bytes.Contains(md, []byte("]("+c.file+")")) {
			t.Errorf("report.md does not show %s", c.file)
		}
		b, err := os.ReadFile(filepath.Join(dirs[1], c.file))
		if err != nil || !bytes.Equal(a, b) {
			t.Errorf("chart %s: two writes of the same report differ (%v)", c.file, err)
		}
	}
	for _, f := range []string{MarkdownFile, JSONFile} {
		a, _ := os.ReadFile(filepath.Join(dirs[0], f))
		b, _ := os.ReadFile(filepath.Join(dirs[1], f))
		if !bytes.Equal(a, b) {
			t.Errorf("%s: two writes of the same report differ", f)
		}
	}

	// The JSON read back gives the same report.
	again, err := Read(filepath.Join(dirs[0], JSONFile))
	if err != nil {
		t.Fatal(err)
	}
	dir3 := t.TempDir()
	if err := Write(dir3, again); err != nil {
		t.Fatal(err)
	}
	md3, _ := os.ReadFile(filepath.Join(dir3, MarkdownFile))
	if !bytes.Equal(md, md3) {
		t.Error("the report of the JSON it wrote differs from the report itself")
	}
}

// TestAnalyzeRatiosPerRepetition checks that a ratio is the median of the ratios of
// each repetition (runs made close in time), not the ratio of the medians, and that
// the targets are judged on it, with fewer than MinReps repetitions not judged.
func TestAnalyzeRatiosPerRepetition(t *testing.T) {
	r := &Report{Schema: SchemaVersion, Config: Config{Reps: 5, RuntimeS: 1}, Jobs: Catalog}
	// The machine's speed changes from one repetition to the next; each repetition the
	// encrypted peer does 0.90, 0.96, 0.99, 1.00 and 1.01 of the unencrypted one. The
	// ratio of the medians (303/300) would be 1.01.
	enc := []float64{900, 192, 495, 250, 303}
	plain := []float64{1000, 200, 500, 250, 300}
	for i := range enc {
		r.Runs = append(r.Runs,
			Run{Level: "ext4", Job: "seqwrite-1m-qd1", Peer: "atrest", Rep: i + 1, BW: enc[i] * 1e6, LatMeanNs: 1e9 / enc[i]},
			Run{Level: "ext4", Job: "seqwrite-1m-qd1", Peer: "plain", Rep: i + 1, BW: plain[i] * 1e6, LatMeanNs: 1e9 / plain[i]})
	}
	// Two repetitions only of another job.
	for i := 1; i <= 2; i++ {
		r.Runs = append(r.Runs,
			Run{Level: "ext4", Job: "randwrite-4k-qd1", Peer: "atrest", Rep: i, BW: 100, LatMeanNs: 10},
			Run{Level: "ext4", Job: "randwrite-4k-qd1", Peer: "plain", Rep: i, BW: 100, LatMeanNs: 10})
	}
	s := Analyze(r)
	c, ok := s.comparison("ext4", "seqwrite-1m-qd1", "atrest", "plain", Throughput)
	if !ok {
		t.Fatal("no comparison of atrest and plain")
	}
	if c.N != 5 || math.Abs(c.Median-0.99) > 1e-6 || math.Abs(c.Min-0.90) > 1e-6 || math.Abs(c.Max-1.01) > 1e-6 {
		t.Errorf("ratio = %+v, want the median 0.99 of the per-repetition ratios, spread 0.90–1.01", c)
	}
	if cell, _ := s.cell("ext4", "seqwrite-1m-qd1", "atrest"); cell.BW != 303e6 {
		t.Errorf("median throughput = %v, want 303e6", cell.BW)
	}
	var got []string
	for _, tr := range s.Targets {
		if tr.Name == targets[0].name { // write throughput ≥ 0.95
			got = append(got, tr.Job+":"+tr.Status)
		}
	}
	want := []string{"seqwrite-1m-qd1:pass", "randwrite-4k-qd1:too few reps"}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("targets = %v, want %v", got, want)
	}
	// Latency is at most 1.05x: 1/0.90 = 1.11 in the first repetition, median 1/0.99.
	for _, tr := range s.Targets {
		if tr.Job == "seqwrite-1m-qd1" && !tr.AtLeast && tr.Status != "pass" {
			t.Errorf("latency target %q: %s (median %.3f)", tr.Name, tr.Status, tr.Median)
		}
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{1, 2}, 1.5}, {[]float64{1, 5, 9}, 5}, {[]float64{1, 2, 3, 10}, 2.5}} {
		if got := medianSorted(c.in); got != c.want {
			t.Errorf("medianSorted(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}
