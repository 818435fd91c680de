// Command fuseserve exposes a drive image, or an NBD export through atrest's NBD client,
// as a fusefs file, for the benchmark (bench/cmd/benchrun): it mounts, prints "ready PATH" on stdout once
// the file is usable, and serves until it gets SIGINT or SIGTERM (then unmounts) or
// until the mount is ended from outside.
//
//	fuseserve -image /dev/shm/drive.img -dir /tmp/bench/fusefs
//	fuseserve -nbd 'nbd+unix:///?socket=/tmp/bench/nbd.sock' -dir /tmp/bench/fusefs [-replay-bytes -1]
//
// With -cpuprofile it writes a CPU profile (go tool pprof) until it stops.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/fusefs"
	"github.com/atrest/atrest/nbd"
)

func main() {
	image := flag.String("image", "", "drive image (regular file or block device) to expose")
	uri := flag.String("nbd", "", "NBD export to expose instead, through atrest's NBD client (nbd:// or nbd+unix:// URI)")
	dir := flag.String("dir", "", "directory to mount the FUSE file system on")
	name := flag.String("name", "volume", "name of the file in the directory")
	direct := flag.Bool("direct", false, "open the image with O_DIRECT")
	replay := flag.Int64("replay-bytes", 0, "the NBD client's replay log (nbd.ClientOptions.ReplayBytes): 0 the default (as atrest mount), -1 none")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile to this file until the server stops")
	flag.Parse()
	if (*image == "") == (*uri == "") || *dir == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: fuseserve (-image PATH [-direct] | -nbd URI) -dir DIR [-name NAME]")
		os.Exit(2)
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "fuseserve:", err)
			os.Exit(1)
		}
	}
	err := run(*image, *uri, *dir, *name, *direct, *replay)
	pprof.StopCPUProfile()
	if err != nil {
		fmt.Fprintln(os.Stderr, "fuseserve:", err)
		os.Exit(1)
	}
}

func run(image, uri, dir, name string, direct bool, replay int64) error {
	var dev blockdev.Device
	var err error
	if uri != "" {
		dev, err = nbd.Dial(context.Background(), uri, nbd.ClientOptions{ReplayBytes: replay})
	} else {
		dev, err = blockdev.OpenFile(image, blockdev.FileOptions{Direct: direct})
	}
	if err != nil {
		return err
	}
	defer dev.Close()
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	srv, err := fusefs.Mount(dir, []fusefs.File{{Name: name, Device: dev}}, fusefs.Options{Logger: logger})
	if err != nil {
		return err
	}
	fmt.Println("ready", srv.Path(name))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-sig:
		if err := srv.Unmount(); err != nil {
			return err
		}
		<-srv.Done()
	case <-srv.Done():
	}
	return nil
}
