// Command falloclog serves an image file as a fusefs file (discards on) and prints every
// fallocate request the file receives, with its mode, and the Device call it became:
// the tool behind the measurements in the fusefs package doc. Attach a loop device to
// the file and see what each operation sends:
//
//	falloclog -image /dev/shm/x.img -dir /tmp/fx &   # prints "ready PATH"
//	losetup --direct-io=on -b 4096 --find --show /tmp/fx/volume
//	blkdiscard -o 0 -l 1M /dev/loopN      # mode 03: PUNCH_HOLE|KEEP_SIZE
//	blkdiscard -z -o 1M -l 1M /dev/loopN  # mode 021 (octal): ZERO_RANGE|KEEP_SIZE
//	fallocate -p -o 2M -l 1M /dev/loopN   # mode 03, like a discard
//	mkfs.ext4 -E lazy_itable_init=1,nodiscard /dev/loopN; mount -o init_itable=0 ...
//	                                      # mke2fs: 021; lazy init: 03; fstrim: 03
//
// With -refuse-zero-range it answers ZERO_RANGE with EOPNOTSUPP (the loop device then
// shows queue/write_zeroes_max_bytes 0 and keeps its discards); with -slow it refuses
// fast zeroing like an encrypted device (a punched hole fails with EOPNOTSUPP and the
// loop device shows queue/discard_max_bytes 0). Linux 6.18.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/fusefs"
)

// logDev prints the zeroing and trimming calls that reach the Device.
type logDev struct {
	blockdev.Device
	slow, refuseZeroRange bool
}

func (d *logDev) WriteZeroes(off, n int64, f blockdev.ZeroFlags) error {
	fmt.Fprintf(os.Stderr, "device: WriteZeroes off=%d n=%d flags=%v\n", off, n, f)
	if d.refuseZeroRange && f == 0 {
		return blockdev.ErrNotSupported
	}
	if d.slow && f&blockdev.ZeroFast != 0 {
		return blockdev.ErrNotFast
	}
	return blockdev.WriteZeroes(d.Device, off, n, f)
}

func (d *logDev) Trim(off, n int64) error {
	fmt.Fprintf(os.Stderr, "device: Trim off=%d n=%d\n", off, n)
	return blockdev.Trim(d.Device, off, n)
}

// fallocates passes on go-fuse's debug lines about FALLOCATE requests.
type fallocates struct{}

func (fallocates) Write(p []byte) (int, error) {
	if strings.Contains(string(p), "FALLOCATE") {
		os.Stderr.Write(p)
	}
	return len(p), nil
}

func main() {
	img := flag.String("image", "", "image file to serve")
	dir := flag.String("dir", "", "directory to mount the FUSE file system on")
	slow := flag.Bool("slow", false, "refuse fast zeroing, like an encrypted device")
	refuseZR := flag.Bool("refuse-zero-range", false, "answer ZERO_RANGE with EOPNOTSUPP")
	flag.Parse()
	if *img == "" || *dir == "" {
		fmt.Fprintln(os.Stderr, "usage: falloclog -image PATH -dir DIR [-slow] [-refuse-zero-range]")
		os.Exit(2)
	}
	d, err := blockdev.OpenFile(*img, blockdev.FileOptions{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "falloclog:", err)
		os.Exit(1)
	}
	defer d.Close()
	logger := slog.New(slog.NewTextHandler(fallocates{}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	dev := &logDev{Device: d, slow: *slow, refuseZeroRange: *refuseZR}
	srv, err := fusefs.Mount(*dir, []fusefs.File{{Name: "volume", Device: dev}}, fusefs.Options{Debug: true, Logger: logger})
	if err != nil {
		fmt.Fprintln(os.Stderr, "falloclog:", err)
		os.Exit(1)
	}
	fmt.Println("ready", srv.Path("volume"))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() { <-sig; srv.Unmount() }()
	srv.Wait()
}
