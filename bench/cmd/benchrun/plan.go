package main

import (
	"fmt"
	"time"

	"github.com/atrest/atrest/bench/report"
)

// mode is how much a run measures and for how long.
type mode struct {
	name          string
	reps          int
	runtime, ramp time.Duration
	driveBytes    int64 // each volume and plain image
	fileBytes     int64 // the fio file in each ext4
	speedArgs     []string
	plan          []levelPlan
}

// levelPlan is the jobs each peer of a level runs.
type levelPlan struct {
	level string
	peers []peerPlan
}

type peerPlan struct {
	peer string
	jobs []string
}

var (
	singleJobs = []string{"seqread-1m-qd1", "seqwrite-1m-qd1", "randread-4k-qd1", "randwrite-4k-qd1"}
	deepJobs   = []string{"seqread-1m-qd8", "seqwrite-1m-qd8", "randread-4k-qd32", "randwrite-4k-qd32"}
	allJobs    = append(append([]string{}, singleJobs...), deepJobs...)
	writeJobs  = []string{"seqwrite-1m-qd1", "randwrite-4k-qd1", "seqwrite-1m-qd8", "randwrite-4k-qd32"}
	seqDeep    = []string{"seqread-1m-qd8", "seqwrite-1m-qd8"}
)

// fullPlan is the full mode's: every job on the main peers, the scaling peers on the
// deep queues, the replay log's cost on the writes, and the rungs of the latency
// ladder that only it needs on the single-stream jobs.
var fullPlan = []levelPlan{
	{"nbd", []peerPlan{
		{"atrest", allJobs}, {"plain", allJobs}, {"nbdkit", allJobs}, {"nbdkit-luks", allJobs},
		{"atrest-2j", deepJobs}, {"atrest-gmp1", deepJobs}, {"atrest-gmp1-2j", deepJobs},
		{"plain-2j", deepJobs}, {"nbdkit-2j", deepJobs},
	}},
	{"fuse", []peerPlan{
		{"atrest", allJobs}, {"plain", allJobs}, {"nbdfuse", allJobs},
		{"atrest-nolog", writeJobs}, {"fusefs-file", singleJobs},
	}},
	{"ext4", []peerPlan{{"atrest", allJobs}, {"plain", allJobs}, {"kernel", allJobs}}},
	{"drive", []peerPlan{{"file", singleJobs}}},
}

// The modes. fio itself takes about half a second more than its run time to start and
// end here (it loads some sixty libraries, ceph's and gluster's among them), more on a
// loaded machine. Run times on this project's 2-core machine, quiet: full about 23
// minutes (112 fio runs per repetition at 2.3 s), quick about 7.5 (62 runs per
// repetition at 1.3 s: single-stream only above the NBD level, nbdkit on the deep
// queues only, scaling on the sequential jobs only), smoke under a minute (one short
// run of one job on every peer of the full mode). With other test suites keeping the
// load average at 15 to 25 on the same 2 cores, full took 34 minutes and quick 12: fio
// then takes a second or more to start and stop.
var modes = map[string]mode{
	"full": {
		name: "full", reps: 5, runtime: 1500 * time.Millisecond, ramp: 300 * time.Millisecond,
		driveBytes: 1 << 30, fileBytes: 512 << 20,
		// atrest speed times each case by CPU time: 0.1 s each is 3 s of CPU (its
		// default, 0.3 s, took 105 s of wall-clock time at a load of 25 on 2 cores).
		speedArgs: []string{"--duration", "100ms"},
		plan:      fullPlan,
	},
	"quick": {
		name: "quick", reps: 5, runtime: 600 * time.Millisecond, ramp: 200 * time.Millisecond,
		driveBytes: 512 << 20, fileBytes: 256 << 20,
		speedArgs: []string{"--duration", "100ms"},
		plan: []levelPlan{
			{"nbd", []peerPlan{
				{"atrest", allJobs}, {"plain", allJobs}, {"nbdkit", deepJobs}, {"nbdkit-luks", deepJobs},
				{"atrest-2j", seqDeep}, {"atrest-gmp1", seqDeep}, {"atrest-gmp1-2j", seqDeep},
			}},
			{"fuse", []peerPlan{{"atrest", singleJobs}, {"plain", singleJobs}, {"nbdfuse", singleJobs}, {"fusefs-file", singleJobs}}},
			{"ext4", []peerPlan{{"atrest", singleJobs}, {"plain", singleJobs}, {"kernel", singleJobs}}},
			{"drive", []peerPlan{{"file", singleJobs}}},
		},
	},
	"smoke": {
		name: "smoke", reps: 1, runtime: 300 * time.Millisecond, ramp: 0,
		driveBytes: 128 << 20, fileBytes: 32 << 20,
		speedArgs: []string{"--duration", "10ms", "--sizes", "4096"},
		plan:      smokePlan(),
	},
}

// smokePlan is one short job on every peer of the full plan.
func smokePlan() []levelPlan {
	var plan []levelPlan
	for _, l := range fullPlan {
		lp := levelPlan{level: l.level}
		for _, p := range l.peers {
			lp.peers = append(lp.peers, peerPlan{p.peer, []string{"randread-4k-qd1"}})
		}
		plan = append(plan, lp)
	}
	return plan
}

// levels describes the levels and their peers for the report.
var levels = []report.Level{
	{ID: "nbd", Title: "NBD export",
		Description: "fio with ioengine=nbd (libnbd; one connection per fio job) on each server's export of a drive in tmpfs.",
		Peers: []report.Peer{
			{ID: "atrest", Label: "atrest (encrypted)", Description: "`atrest serve` of a drive formatted by `atrest drive format` (LUKS2, XTS-AES-256, 4096-byte sectors)"},
			{ID: "plain", Label: "atrest (unencrypted)", Description: "bench/cmd/plainserve: atrest's NBD server over a plain image, no encryption"},
			{ID: "nbdkit", Label: "nbdkit file", Description: "`nbdkit file` over the same plain image"},
			{ID: "nbdkit-luks", Label: "nbdkit + luks", Description: "`nbdkit file --filter=luks` over a LUKS1 image made by cryptsetup (aes-xts-plain64, 512-bit key; nbdkit 1.32's luks filter reads only LUKS1)"},
			{ID: "atrest-2j", Label: "atrest, 2 jobs", Description: "atrest (encrypted) with two fio jobs, two connections, each on half of the export", NumJobs: 2},
			{ID: "atrest-gmp1", Label: "atrest, GOMAXPROCS=1", Description: "a second `atrest serve`, of a drive of its own, with GOMAXPROCS=1", GOMAXPROCS: 1},
			{ID: "atrest-gmp1-2j", Label: "atrest, GOMAXPROCS=1, 2 jobs", Description: "the same with two fio jobs", NumJobs: 2, GOMAXPROCS: 1},
			{ID: "plain-2j", Label: "unencrypted, 2 jobs", Description: "atrest (unencrypted) with two fio jobs", NumJobs: 2},
			{ID: "nbdkit-2j", Label: "nbdkit, 2 jobs", Description: "nbdkit file with two fio jobs", NumJobs: 2},
		}},
	{ID: "fuse", Title: "FUSE file",
		Description: "fio (libaio, direct I/O) on the file a FUSE daemon exposes for an NBD export: the whole export.",
		Peers: []report.Peer{
			{ID: "atrest", Label: "atrest (encrypted)", Description: "fusefs over atrest's NBD client (bench/fuse/fuseserve, the client's defaults as in `atrest mount`: multi-conn, replay log on) over the `atrest serve` export"},
			{ID: "plain", Label: "atrest (unencrypted)", Description: "the same over the plainserve export"},
			{ID: "nbdfuse", Label: "nbdfuse", Description: "nbdfuse (libnbd + libfuse) over the same `atrest serve` export"},
			{ID: "atrest-nolog", Label: "atrest, no replay log", Description: "atrest (encrypted) with the NBD client's replay log off: the log's cost"},
			{ID: "fusefs-file", Label: "fusefs over the image", Description: "fusefs straight over the plain image file, no NBD: the FUSE hop alone"},
		}},
	{ID: "ext4", Title: "ext4 via atrest mount",
		Description: "fio (libaio, direct I/O) on a file in ext4, laid out before the runs.",
		Peers: []report.Peer{
			{ID: "atrest", Label: "atrest mount (encrypted)", Description: "`atrest mount` (NBD client → FUSE file → loop device with direct I/O → ext4) of an `atrest serve` volume"},
			{ID: "plain", Label: "atrest mount (unencrypted)", Description: "`atrest mount` of a plainserve export"},
			{ID: "kernel", Label: "kernel ext4 on loop", Description: "ext4 on a loop device (direct I/O) over a plain image: the kernel-only ceiling"},
		}},
	{ID: "drive", Title: "The drive",
		Description: "fio (libaio, direct I/O) on the plain image file in tmpfs itself: the floor of the latency ladder.",
		Peers: []report.Peer{
			{ID: "file", Label: "image file", Description: "the plain image file"},
		}},
}

func levelInfo(id string) (report.Level, bool) {
	for _, l := range levels {
		if l.ID == id {
			return l, true
		}
	}
	return report.Level{}, false
}

func peerInfo(level, id string) (report.Peer, bool) {
	l, ok := levelInfo(level)
	if !ok {
		return report.Peer{}, false
	}
	for _, p := range l.Peers {
		if p.ID == id {
			return p, true
		}
	}
	return report.Peer{}, false
}

// step is one fio run of the plan.
type step struct {
	level, peer string
	job         report.Job
	rep         int
}

// steps orders the plan's runs: level by level, job by job, and for each job every
// repetition in turn, each repetition running every peer once, the order of the peers
// rotated by one from one repetition to the next (A B C, B C A, C A B...): a ratio
// between two peers is made of runs close in time, and no peer always runs first.
func (m mode) steps() ([]step, error) {
	var out []step
	for _, lp := range m.plan {
		if _, ok := levelInfo(lp.level); !ok {
			return nil, fmt.Errorf("plan: unknown level %q", lp.level)
		}
		for _, j := range report.Catalog {
			var peers []string
			for _, pp := range lp.peers {
				if _, ok := peerInfo(lp.level, pp.peer); !ok {
					return nil, fmt.Errorf("plan: unknown peer %q of level %q", pp.peer, lp.level)
				}
				for _, id := range pp.jobs {
					if _, ok := report.CatalogJob(id); !ok {
						return nil, fmt.Errorf("plan: unknown job %q", id)
					}
					if id == j.ID {
						peers = append(peers, pp.peer)
					}
				}
			}
			for rep := 1; rep <= m.reps; rep++ {
				for k := range peers {
					p := peers[(k+rep-1)%len(peers)]
					out = append(out, step{level: lp.level, peer: p, job: j, rep: rep})
				}
			}
		}
	}
	return out, nil
}

// uses reports whether the plan runs anything on this peer of this level.
func (m mode) uses(level, peer string) bool {
	for _, lp := range m.plan {
		for _, pp := range lp.peers {
			if lp.level == level && pp.peer == peer && len(pp.jobs) > 0 {
				return true
			}
		}
	}
	return false
}
