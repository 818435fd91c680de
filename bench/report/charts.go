package report

import (
	"bytes"
	"fmt"
	"image/color"
	"math"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// chartList names the charts Charts draws, in the order the report shows them.
var chartList = []struct{ file, title string }{
	{"encryption.png", "Encryption cost: encrypted / unencrypted throughput at each level"},
	{"peers-nbd.png", "NBD export: each peer against atrest unencrypted"},
	{"peers-fuse.png", "FUSE file: each peer against atrest unencrypted"},
	{"peers-ext4.png", "ext4: each peer against atrest mount unencrypted"},
	{"latency.png", "Single-stream 4 KiB latency, hop by hop"},
	{"scaling.png", "Scaling with connections and GOMAXPROCS"},
	{"xts.png", "XTS-AES-256 per core against OpenSSL"},
}

// Charts draws the report's charts as PNG files, by name. The same report gives the
// same bytes: nothing in them depends on the time or the order of a map.
func Charts(r *Report, s *Summary) (map[string][]byte, error) {
	out := map[string][]byte{}
	add := func(name string, p *plot.Plot, w, h vg.Length, err error) error {
		if err != nil {
			return fmt.Errorf("chart %s: %w", name, err)
		}
		if p == nil {
			return nil
		}
		png, err := render(p, w, h)
		if err != nil {
			return fmt.Errorf("chart %s: %w", name, err)
		}
		out[name] = png
		return nil
	}
	p, err := encryptionChart(r)
	if err := add("encryption.png", p, 22*vg.Centimeter, 10*vg.Centimeter, err); err != nil {
		return nil, err
	}
	for _, l := range r.Levels {
		if l.ID == "drive" {
			continue
		}
		p, err := peersChart(r, l)
		if err := add("peers-"+l.ID+".png", p, 22*vg.Centimeter, 10*vg.Centimeter, err); err != nil {
			return nil, err
		}
	}
	p, err = latencyChart(s)
	if err := add("latency.png", p, 22*vg.Centimeter, 11*vg.Centimeter, err); err != nil {
		return nil, err
	}
	p, err = scalingChart(r)
	if err := add("scaling.png", p, 22*vg.Centimeter, 10*vg.Centimeter, err); err != nil {
		return nil, err
	}
	p, err = xtsChart(r)
	if err := add("xts.png", p, 16*vg.Centimeter, 9*vg.Centimeter, err); err != nil {
		return nil, err
	}
	return out, nil
}

func render(p *plot.Plot, w, h vg.Length) ([]byte, error) {
	wt, err := p.WriterTo(w, h, "png")
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	if _, err := wt.WriteTo(&b); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// series is one set of points of a dot plot: a median and its spread per category
// (NaN where it was not measured).
type series struct {
	name           string
	mid, low, high []float64
}

// dotPlot draws each series as points with min–max whiskers, the series of one
// category side by side, and a dashed line at each of refs.
func dotPlot(title, ylabel string, categories []string, ss []series, refs []float64) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Legend.Top = true
	p.Legend.Left = true
	p.X.Tick.Label.Rotation = -0.5
	p.X.Tick.Label.XAlign = draw.XLeft
	p.X.Tick.Label.YAlign = draw.YTop
	ticks := make([]plot.Tick, len(categories))
	for i, c := range categories {
		ticks[i] = plot.Tick{Value: float64(i), Label: c}
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	p.X.Min, p.X.Max = -0.6, float64(len(categories))-0.4
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, r := range refs {
		lo, hi = math.Min(lo, r), math.Max(hi, r)
	}
	for k, s := range ss {
		off := 0.0
		if len(ss) > 1 {
			off = -0.3 + 0.6*float64(k)/float64(len(ss)-1)
		}
		var pts errPoints
		for i := range categories {
			if math.IsNaN(s.mid[i]) {
				continue
			}
			pts = append(pts, errPoint{x: float64(i) + off, y: s.mid[i], low: s.mid[i] - s.low[i], high: s.high[i] - s.mid[i]})
			lo, hi = math.Min(lo, s.low[i]), math.Max(hi, s.high[i])
		}
		if len(pts) == 0 {
			continue
		}
		sc, err := plotter.NewScatter(pts)
		if err != nil {
			return nil, err
		}
		sc.GlyphStyle.Color = colorOf(k)
		sc.GlyphStyle.Shape = plotutil.Shape(k)
		sc.GlyphStyle.Radius = vg.Points(3)
		eb, err := plotter.NewYErrorBars(pts)
		if err != nil {
			return nil, err
		}
		eb.LineStyle.Color = colorOf(k)
		eb.CapWidth = vg.Points(4)
		p.Add(sc, eb)
		p.Legend.Add(s.name, sc)
	}
	if math.IsInf(lo, 1) {
		return nil, nil // nothing measured
	}
	for _, r := range refs {
		l, err := plotter.NewLine(plotter.XYs{{X: p.X.Min, Y: r}, {X: p.X.Max, Y: r}})
		if err != nil {
			return nil, err
		}
		l.LineStyle.Color = color.Gray{Y: 100}
		l.LineStyle.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		p.Add(l)
	}
	pad := (hi - lo) * 0.08
	if pad == 0 {
		pad = 0.05
	}
	// Room at the top for the legend, about 6% of the height per line.
	span := (hi - lo + 2*pad) / math.Max(0.3, 1-0.065*float64(len(ss)))
	p.Y.Min, p.Y.Max = lo-pad, lo-pad+span
	p.Add(plotter.NewGrid())
	return p, nil
}

// palette is Tableau's ten colours: the charts have up to nine series.
var palette = []color.Color{
	color.RGBA{78, 121, 167, 255}, color.RGBA{242, 142, 43, 255}, color.RGBA{225, 87, 89, 255},
	color.RGBA{118, 183, 178, 255}, color.RGBA{89, 161, 79, 255}, color.RGBA{237, 201, 72, 255},
	color.RGBA{176, 122, 161, 255}, color.RGBA{255, 157, 167, 255}, color.RGBA{156, 117, 95, 255},
	color.RGBA{186, 176, 172, 255},
}

func colorOf(i int) color.Color { return palette[i%len(palette)] }

type errPoint struct{ x, y, low, high float64 }

type errPoints []errPoint

func (e errPoints) Len() int                        { return len(e) }
func (e errPoints) XY(i int) (float64, float64)     { return e[i].x, e[i].y }
func (e errPoints) YError(i int) (float64, float64) { return e[i].low, e[i].high }

// ratioSeries is the per-repetition ratio num/den of throughput for each job.
func ratioSeries(r *Report, runs map[runKey]Run, name, level, num, den string, jobs []Job) series {
	s := series{name: name}
	for _, j := range jobs {
		c, ok := compare(r, runs, level, j.ID, num, den, Throughput)
		if !ok {
			s.mid, s.low, s.high = append(s.mid, math.NaN()), append(s.low, math.NaN()), append(s.high, math.NaN())
			continue
		}
		s.mid, s.low, s.high = append(s.mid, c.Median), append(s.low, c.Min), append(s.high, c.Max)
	}
	return s
}

func runIndex(r *Report) map[runKey]Run {
	m := map[runKey]Run{}
	for _, run := range r.Runs {
		m[runKey{run.Level, run.Job, run.Peer, run.Rep}] = run
	}
	return m
}

// jobsRun are the report's jobs that some run of the level ran, with their short
// names for a chart's axis.
func jobsRun(r *Report, level string) ([]Job, []string) {
	ran := map[string]bool{}
	for _, run := range r.Runs {
		if level == "" || run.Level == level {
			ran[run.Job] = true
		}
	}
	var jobs []Job
	var names []string
	for _, j := range r.Jobs {
		if ran[j.ID] {
			jobs = append(jobs, j)
			names = append(names, j.ID)
		}
	}
	return jobs, names
}

func encryptionChart(r *Report) (*plot.Plot, error) {
	runs := runIndex(r)
	jobs, names := jobsRun(r, "")
	var ss []series
	for _, l := range r.Levels {
		if _, ok := l.peer("atrest"); !ok {
			continue
		}
		if _, ok := l.peer("plain"); !ok {
			continue
		}
		ss = append(ss, ratioSeries(r, runs, l.Title, l.ID, "atrest", "plain", jobs))
	}
	return dotPlot("atrest encrypted / the same stack unencrypted (median, min–max)", "throughput ratio", names, ss, []float64{1})
}

func peersChart(r *Report, l Level) (*plot.Plot, error) {
	if _, ok := l.peer("plain"); !ok {
		return nil, nil
	}
	runs := runIndex(r)
	jobs, names := jobsRun(r, l.ID)
	var ss []series
	for _, p := range l.Peers {
		if p.ID == "plain" || p.Scaling() {
			continue
		}
		ss = append(ss, ratioSeries(r, runs, p.Label, l.ID, p.ID, "plain", jobs))
	}
	den, _ := l.peer("plain")
	return dotPlot(l.Title+": throughput / "+den.Label+" (median, min–max)", "throughput ratio", names, ss, []float64{1})
}

// latencyChart draws the ladder: the single-stream 4 KiB mean latency of each stack.
func latencyChart(s *Summary) (*plot.Plot, error) {
	jobs := []string{"randread-4k-qd1", "randwrite-4k-qd1"}
	var labels []string
	vals := make([]plotter.Values, len(jobs))
	for _, g := range rungs {
		found := false
		row := make([]float64, len(jobs))
		for k, j := range jobs {
			if c, ok := s.cell(g.level, j, g.peer); ok {
				found = true
				row[k] = c.LatMeanNs / 1e3
			}
		}
		if !found {
			continue
		}
		labels = append(labels, g.label)
		for k := range jobs {
			vals[k] = append(vals[k], row[k])
		}
	}
	if len(labels) == 0 {
		return nil, nil
	}
	// Top to bottom as in the report's table: the first rung at the top.
	for i, j := 0, len(labels)-1; i < j; i, j = i+1, j-1 {
		labels[i], labels[j] = labels[j], labels[i]
		for k := range vals {
			vals[k][i], vals[k][j] = vals[k][j], vals[k][i]
		}
	}
	p := plot.New()
	p.Title.Text = "Single-stream 4 KiB mean latency, submission to completion (median)"
	p.X.Label.Text = "µs"
	p.Legend.Top = true
	p.Legend.YOffs = -vg.Points(4)
	p.X.Min = 0
	for _, v := range vals {
		for _, x := range v {
			p.X.Max = math.Max(p.X.Max, x*1.08)
		}
	}
	w := vg.Points(7)
	for k, j := range jobs {
		b, err := plotter.NewBarChart(vals[k], w)
		if err != nil {
			return nil, err
		}
		b.Horizontal = true
		b.Color = colorOf(k)
		b.LineStyle.Width = 0
		b.Offset = w * vg.Length(float64(k)-0.5)
		p.Add(b)
		p.Legend.Add(jobTitle(j), b)
	}
	p.NominalY(labels...)
	p.Add(plotter.NewGrid())
	return p, nil
}

// scalingChart draws the scaling ratios: two jobs against one, GOMAXPROCS 2 against 1.
func scalingChart(r *Report) (*plot.Plot, error) {
	l := r.level("nbd")
	if l == nil {
		return nil, nil
	}
	runs := runIndex(r)
	var jobs []Job
	var names []string
	var ss []series
	var defs []comparisonDef
	for _, c := range comparisons {
		if c.level == "nbd" && (isScaling(*l, c.num) || isScaling(*l, c.den)) {
			defs = append(defs, c)
		}
	}
	for _, j := range r.Jobs {
		for _, c := range defs {
			if _, ok := compare(r, runs, "nbd", j.ID, c.num, c.den, Throughput); ok {
				jobs, names = append(jobs, j), append(names, j.ID)
				break
			}
		}
	}
	for _, c := range defs {
		ss = append(ss, ratioSeries(r, runs, c.label, "nbd", c.num, c.den, jobs))
	}
	if len(jobs) == 0 {
		return nil, nil
	}
	return dotPlot("NBD export: scaling with jobs (connections) and GOMAXPROCS (median, min–max)", "throughput ratio", names, ss, []float64{1, 2})
}

func xtsChart(r *Report) (*plot.Plot, error) {
	if len(r.Speed) == 0 {
		return nil, nil
	}
	sizes, impls := r.speedAxes()
	p := plot.New()
	p.Title.Text = "XTS-AES-256 encryption on one core"
	p.Y.Label.Text = "GB/s"
	p.Legend.Top = true
	p.Legend.Left = true
	var names []string
	for _, sz := range sizes {
		names = append(names, sizeText(sz))
	}
	w := vg.Points(8)
	for k, impl := range impls {
		vals := make(plotter.Values, len(sizes))
		for i, sz := range sizes {
			vals[i], _ = r.speed(impl, "encrypt", sz)
			// Room at the top for the legend.
			p.Y.Max = math.Max(p.Y.Max, vals[i]/math.Max(0.3, 1-0.075*float64(len(impls))))
		}
		b, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return nil, err
		}
		b.Color = colorOf(k)
		b.LineStyle.Width = 0
		b.Offset = w * vg.Length(float64(k)-float64(len(impls)-1)/2)
		p.Add(b)
		p.Legend.Add(impl, b)
	}
	p.NominalX(names...)
	p.Add(plotter.NewGrid())
	return p, nil
}
