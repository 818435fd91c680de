// Package report holds the figures of one benchmark run (bench/run.sh, the benchrun
// command) and turns them into docs/bench/: the JSON of every figure, a Markdown
// report with the ratios and the targets of DESIGN §8, and PNG charts.
//
// A run measures levels (the NBD export, the FUSE file, a file in ext4 mounted with
// `atrest mount`, the bare drive), each with its peers (atrest encrypted, the same
// stack unencrypted, nbdkit, nbdfuse, the kernel...), with fio jobs, each job on every
// peer of its level in turn, the order rotated from one repetition to the next. A
// ratio between two peers is computed per repetition, from runs made one after the
// other, and reported as the median of those ratios with their spread (min–max).
//
// The package is the bench program's alone: the product packages do not import it
// (nor gonum.org/v1/plot, which it uses for the charts).
package report

import (
	"encoding/json"
	"fmt"
	"os"
	"time"
)

// SchemaVersion is the version of the JSON form of Report.
const SchemaVersion = 1

// Report is one benchmark run: how and where it ran, and every figure it measured.
type Report struct {
	Schema  int       `json:"schema"`
	Mode    string    `json:"mode"`    // "full", "quick" or "smoke"
	Command string    `json:"command"` // the command line that produced it
	Started time.Time `json:"started"`
	Seconds float64   `json:"seconds"` // wall-clock time of the whole run
	Commit  string    `json:"commit"`  // git commit of the code measured
	Dirty   bool      `json:"dirty"`   // the tree had uncommitted changes
	Machine Machine   `json:"machine"`
	Config  Config    `json:"config"`
	Levels  []Level   `json:"levels"`
	Jobs    []Job     `json:"jobs"`
	Runs    []Run     `json:"runs"`
	// Speed is `atrest speed --json`: XTS throughput per core, OpenSSL's included.
	Speed []Speed `json:"xts_speed,omitempty"`
	// SpeedImpl is the implementation atrest uses on this CPU.
	SpeedImpl string   `json:"xts_impl,omitempty"`
	Notes     []string `json:"notes,omitempty"`
	// Summary is computed from the runs (Analyze) when the report is written; it is
	// there for readers of the JSON and ignored when a report is read back.
	Summary *Summary `json:"summary,omitempty"`
}

// Machine describes where the run happened.
type Machine struct {
	CPU       string            `json:"cpu"`
	Cores     int               `json:"cores"`
	MemoryGiB float64           `json:"memory_gib"`
	Kernel    string            `json:"kernel"`
	Go        string            `json:"go"`
	Tools     map[string]string `json:"tools,omitempty"` // versions: fio, nbdkit, openssl...
	// LoadStart and LoadEnd are /proc/loadavg (1, 5, 15 minutes) before and after.
	LoadStart [3]float64 `json:"load_start"`
	LoadEnd   [3]float64 `json:"load_end"`
}

// Config is what every run had in common.
type Config struct {
	Reps       int     `json:"reps"`
	RuntimeS   float64 `json:"runtime_s"` // measured seconds per fio run
	RampS      float64 `json:"ramp_s"`    // seconds before the measurement starts
	ImageDir   string  `json:"image_dir"`
	ImageFS    string  `json:"image_fs"` // file system type of ImageDir (tmpfs)
	DriveBytes int64   `json:"drive_bytes"`
	FileBytes  int64   `json:"file_bytes"` // the fio file in ext4
	IOEngine   string  `json:"ioengine"`   // fio's engine on files (the nbd level uses nbd)
}

// Level is one place a user can put I/O, with the peers measured there.
type Level struct {
	ID          string `json:"id"`
	Title       string `json:"title"`
	Description string `json:"description"`
	Peers       []Peer `json:"peers"`
}

// Peer is one stack measured at a level.
type Peer struct {
	ID          string `json:"id"`
	Label       string `json:"label"`
	Description string `json:"description"`
	// NumJobs is fio's numjobs (one NBD connection each at the nbd level); 0 means 1.
	NumJobs int `json:"numjobs,omitempty"`
	// GOMAXPROCS is the atrest server's, when set; 0 means Go's default (the cores).
	GOMAXPROCS int `json:"gomaxprocs,omitempty"`
}

// Scaling reports whether the peer exists to show scaling (more jobs, fewer
// threads) rather than to be compared with its level's other peers.
func (p Peer) Scaling() bool { return p.NumJobs > 1 || p.GOMAXPROCS > 0 }

// Job is one fio job.
type Job struct {
	ID        string `json:"id"`
	RW        string `json:"rw"` // read, write, randread, randwrite
	BlockSize int    `json:"bs"`
	Depth     int    `json:"iodepth"`
}

// Single reports whether the job is single-stream: one job at depth 1.
func (j Job) Single() bool { return j.Depth == 1 }

// Write reports whether the job writes.
func (j Job) Write() bool { return j.RW == "write" || j.RW == "randwrite" }

// Title is the job in words, e.g. "1 MiB seq. write, depth 8".
func (j Job) Title() string {
	kind := "seq."
	if j.RW == "randread" || j.RW == "randwrite" {
		kind = "random"
	}
	dir := "read"
	if j.Write() {
		dir = "write"
	}
	return fmt.Sprintf("%s %s %s, depth %d", sizeText(j.BlockSize), kind, dir, j.Depth)
}

func sizeText(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// Catalog is every fio job the benchmark knows, in the order the report lists them:
// single-stream (one job, depth 1) first, then the deep queues.
var Catalog = []Job{
	{"seqread-1m-qd1", "read", 1 << 20, 1},
	{"seqwrite-1m-qd1", "write", 1 << 20, 1},
	{"randread-4k-qd1", "randread", 4096, 1},
	{"randwrite-4k-qd1", "randwrite", 4096, 1},
	{"seqread-1m-qd8", "read", 1 << 20, 8},
	{"seqwrite-1m-qd8", "write", 1 << 20, 8},
	{"randread-4k-qd32", "randread", 4096, 32},
	{"randwrite-4k-qd32", "randwrite", 4096, 32},
}

// CatalogJob returns the job of the catalog with this ID.
func CatalogJob(id string) (Job, bool) {
	for _, j := range Catalog {
		if j.ID == id {
			return j, true
		}
	}
	return Job{}, false
}

// Run is one fio run of one job on one peer.
type Run struct {
	Level string `json:"level"`
	Job   string `json:"job"`
	Peer  string `json:"peer"`
	Rep   int    `json:"rep"` // 1-based repetition
	Seq   int    `json:"seq"` // position in the whole run, from 1
	// BW is bytes per second; IOPS requests per second.
	BW   float64 `json:"bw_bytes"`
	IOPS float64 `json:"iops"`
	// Latency of the requests from submission to completion (fio's lat), in
	// nanoseconds, and the mean of the submission alone (fio's slat).
	LatMeanNs  float64 `json:"lat_mean_ns"`
	LatP99Ns   float64 `json:"lat_p99_ns"`
	SlatMeanNs float64 `json:"slat_mean_ns"`
	// StackCPU is the CPU time (user and system) of the peer's user-space processes
	// (servers, FUSE daemons) during the fio run, ramp included; 0 for kernel peers.
	StackCPU float64 `json:"stack_cpu_s,omitempty"`
	// FioCPU is fio's own CPU time per second (usr+sys, 1 = one core).
	FioCPU float64 `json:"fio_cpu"`
	// Load1 is the one-minute load average when the run started; BusyCPUs how many
	// CPUs the whole machine kept busy during the run (from /proc/stat).
	Load1    float64 `json:"load1"`
	BusyCPUs float64 `json:"busy_cpus"`
	// Seconds is the wall-clock time of the fio process.
	Seconds float64 `json:"seconds"`
}

// Speed is one line of `atrest speed --json`.
type Speed struct {
	Impl string  `json:"impl"`
	Op   string  `json:"op"`
	Size int     `json:"size"`
	GBps float64 `json:"gbps"`
}

// Read reads a report from its JSON file.
func Read(path string) (*Report, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Report
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if r.Schema != SchemaVersion {
		return nil, fmt.Errorf("%s: schema %d, this program reads %d", path, r.Schema, SchemaVersion)
	}
	r.Summary = nil
	return &r, nil
}

func (r *Report) level(id string) *Level {
	for i := range r.Levels {
		if r.Levels[i].ID == id {
			return &r.Levels[i]
		}
	}
	return nil
}

func (l *Level) peer(id string) (Peer, bool) {
	for _, p := range l.Peers {
		if p.ID == id {
			return p, true
		}
	}
	return Peer{}, false
}
