package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/atrest/atrest/bench/report"
)

// fioArgs is the command line of one fio run of job j on t.
func (b *bench) fioArgs(j report.Job, t target, numjobs int) []string {
	args := []string{"fio", "--name=" + j.ID, "--rw=" + j.RW, "--bs=" + strconv.Itoa(j.BlockSize),
		"--iodepth=" + strconv.Itoa(j.Depth),
		"--time_based=1", "--runtime=" + msec(b.mode.runtime), "--ramp_time=" + msec(b.mode.ramp),
		"--group_reporting=1", "--randrepeat=0", "--norandommap=1", "--lat_percentiles=1", "--output-format=json"}
	size := t.size
	if numjobs > 1 {
		// Each job (connection) on its own part of the drive.
		size = t.size / int64(numjobs) / int64(j.BlockSize) * int64(j.BlockSize)
		args = append(args, "--numjobs="+strconv.Itoa(numjobs), "--offset_increment="+strconv.FormatInt(size, 10))
	}
	args = append(args, "--size="+strconv.FormatInt(size, 10))
	if t.uri != "" {
		return append(args, "--ioengine=nbd", "--uri="+t.uri)
	}
	return append(args, "--ioengine="+ioengine, "--direct=1", "--filename="+t.file)
}

// ioengine is fio's engine on files.
const ioengine = "libaio"

func msec(d time.Duration) string { return strconv.FormatInt(d.Milliseconds(), 10) + "ms" }

// fioResult is what the report keeps of fio's JSON output.
type fioResult struct {
	Jobs []struct {
		Error  int     `json:"error"`
		Read   fioDir  `json:"read"`
		Write  fioDir  `json:"write"`
		UsrCPU float64 `json:"usr_cpu"` // percent of one CPU
		SysCPU float64 `json:"sys_cpu"`
	} `json:"jobs"`
}

type fioDir struct {
	IOBytes int64   `json:"io_bytes"`
	BW      float64 `json:"bw_bytes"`
	IOPS    float64 `json:"iops"`
	// Lat is from submission to completion (with --lat_percentiles, with its
	// percentiles); Slat the submission alone. Where io_submit does the whole I/O
	// before it returns (FUSE without asynchronous direct I/O), clat, the time from
	// submission to completion, is next to nothing: lat is what a user waits.
	Lat  latency `json:"lat_ns"`
	Slat latency `json:"slat_ns"`
}

type latency struct {
	Mean       float64            `json:"mean"`
	Percentile map[string]float64 `json:"percentile"`
}

// parseFio reads fio's JSON output into run. fio may print lines before the JSON
// (with the nbd engine, "fio: connected to NBD server").
func parseFio(out []byte, run *report.Run) error {
	i := bytes.Index(out, []byte("\n{"))
	switch {
	case bytes.HasPrefix(out, []byte("{")):
		i = 0
	case i >= 0:
		i++
	default:
		return fmt.Errorf("no JSON in fio's output: %.200q", out)
	}
	var r fioResult
	if err := json.Unmarshal(out[i:], &r); err != nil {
		return fmt.Errorf("fio's JSON: %w", err)
	}
	if len(r.Jobs) != 1 {
		return fmt.Errorf("fio reported %d jobs, want 1 (group_reporting)", len(r.Jobs))
	}
	j := r.Jobs[0]
	if j.Error != 0 {
		return fmt.Errorf("fio reported error %d", j.Error)
	}
	d := j.Read
	if j.Write.IOBytes > 0 {
		d = j.Write
	}
	if d.IOBytes == 0 {
		return fmt.Errorf("fio moved no data")
	}
	run.BW, run.IOPS = d.BW, d.IOPS
	run.LatMeanNs = d.Lat.Mean
	run.LatP99Ns = d.Lat.Percentile["99.000000"]
	run.SlatMeanNs = d.Slat.Mean
	run.FioCPU = (j.UsrCPU + j.SysCPU) / 100
	return nil
}

// measure runs one step and returns its figures. A failed fio run is tried once more:
// on a shared machine a run may be cut short.
func (b *bench) measure(ctx context.Context, s step) (report.Run, error) {
	t, ok := b.targets[s.level+"/"+s.peer]
	if !ok {
		return report.Run{}, fmt.Errorf("no stack for %s/%s", s.level, s.peer)
	}
	info, _ := peerInfo(s.level, s.peer)
	numjobs := max(info.NumJobs, 1)
	var err error
	for try := 0; try < 2; try++ {
		run := report.Run{Level: s.level, Job: s.job.ID, Peer: s.peer, Rep: s.rep}
		run.Load1 = loadavg()[0]
		busy0, total0 := cpuTicks()
		cpu0 := procsCPU(t.pids)
		start := time.Now()
		var out []byte
		out, err = b.run(ctx, nil, b.fioArgs(s.job, t, numjobs)...)
		run.Seconds = time.Since(start).Seconds()
		if ctx.Err() != nil {
			return report.Run{}, ctx.Err()
		}
		if err == nil {
			err = parseFio(out, &run)
		}
		if err == nil {
			run.StackCPU = procsCPU(t.pids) - cpu0
			if busy1, total1 := cpuTicks(); total1 > total0 {
				run.BusyCPUs = float64(busy1-busy0) / float64(total1-total0) * float64(len(cpuList()))
			}
			return run, nil
		}
		b.progressf("%s %s on %s, repetition %d: %v (trying again)", s.level, s.job.ID, s.peer, s.rep, err)
	}
	return report.Run{}, fmt.Errorf("%s %s on %s: %w", s.level, s.job.ID, s.peer, err)
}

// procsCPU is the CPU time, in seconds, the processes have used (user and system,
// all threads).
func procsCPU(pids []int) float64 {
	var ticks int64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// Fields after the command (which may hold spaces), from field 3 (state).
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64) // utime, field 14
		k, _ := strconv.ParseInt(f[12], 10, 64) // stime, field 15
		ticks += u + k
	}
	return float64(ticks) / clockTicks
}

// clockTicks is USER_HZ, the unit of /proc's CPU times: 100 on every Linux
// architecture Go supports.
const clockTicks = 100

// cpuTicks returns the busy and total CPU time of the machine from /proc/stat.
func cpuTicks() (busy, total int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, 0
	}
	var v [10]int64
	for i := 1; i < len(f) && i <= 10; i++ {
		v[i-1], _ = strconv.ParseInt(f[i], 10, 64)
	}
	// user nice system idle iowait irq softirq steal (guest time is in user already).
	for i := 0; i < 8; i++ {
		total += v[i]
	}
	return total - v[3] - v[4], total
}

// cpuList is the machine's online CPUs (lines cpu0, cpu1... of /proc/stat).
func cpuList() []string {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return nil
	}
	var cpus []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "cpu") && len(line) > 3 && line[3] >= '0' && line[3] <= '9' {
			cpus = append(cpus, strings.Fields(line)[0])
		}
	}
	return cpus
}

func loadavg() [3]float64 {
	var l [3]float64
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return l
	}
	f := strings.Fields(string(b))
	for i := 0; i < 3 && i < len(f); i++ {
		l[i], _ = strconv.ParseFloat(f[i], 64)
	}
	return l
}
