// Command fuseserve exposes one drive image as a fusefs file, for bench/fuse-fio.sh: it
// mounts, prints "ready PATH" on stdout once the file is usable, and serves until it
// gets SIGINT or SIGTERM (then unmounts) or until the mount is ended from outside.
//
//	fuseserve -image /dev/shm/drive.img -dir /run/atrest-bench/fusefs
//
// The benchmark's later mode (fusefs over atrest's NBD client against nbdfuse over the
// same `atrest serve`) adds a -nbd URI flag here once the client exists.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/fusefs"
)

func main() {
	image := flag.String("image", "", "drive image (regular file or block device) to expose")
	dir := flag.String("dir", "", "directory to mount the FUSE file system on")
	name := flag.String("name", "volume", "name of the file in the directory")
	direct := flag.Bool("direct", false, "open the image with O_DIRECT")
	flag.Parse()
	if *image == "" || *dir == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: fuseserve -image PATH -dir DIR [-name NAME] [-direct]")
		os.Exit(2)
	}
	if err := run(*image, *dir, *name, *direct); err != nil {
		fmt.Fprintln(os.Stderr, "fuseserve:", err)
		os.Exit(1)
	}
}

func run(image, dir, name string, direct bool) error {
	dev, err := blockdev.OpenFile(image, blockdev.FileOptions{Direct: direct})
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
	done := make(chan struct{})
	go func() { srv.Wait(); close(done) }()
	select {
	case <-sig:
		if err := srv.Unmount(); err != nil {
			return err
		}
		<-done
	case <-done:
	}
	return nil
}
