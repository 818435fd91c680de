// Command plainserve is a benchmark helper: it serves image files over NBD through
// atrest's nbd server, unencrypted, so that the benchmark (bench/cmd/benchrun) can set
// `atrest serve`'s encrypted exports against the same server code without the
// encryption. With -encrypt it puts blockcrypt (XTS-AES-256, a random key, 4096-byte
// sectors) over each file: the encrypted path without the keystore, for profiling it
// with -cpuprofile.
//
//	plainserve -listen unix:/tmp/bench/plain.sock [-listen tcp:127.0.0.1:10809] [-encrypt] FILE...
//
// One file is the default export ""; several are exported under their base names. It
// prints "ready" on stdout (and tells systemd READY=1) once it accepts connections, and
// stops cleanly on SIGINT or SIGTERM. It is not part of atrest: keys are thrown away.
// Its exports let several writers in at once (as `atrest serve --shared-writers` does
// for the benchmark): the benchmark's peers take turns on one export.
package main

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"syscall"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/internal/linelog"
	"github.com/atrest/atrest/internal/serving"
	"github.com/atrest/atrest/nbd"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

func main() {
	var listens listFlag
	flag.Var(&listens, "listen", "unix:PATH or tcp:HOST:PORT (repeatable)")
	encrypt := flag.Bool("encrypt", false, "serve through blockcrypt with a random key")
	direct := flag.Bool("direct", false, "open the files with O_DIRECT")
	trim := flag.Bool("trim", false, "let blockcrypt pass discards on (-encrypt; a plain file takes them where its file system can)")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile to this file until the server stops")
	flag.Parse()
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "plainserve:", err)
			os.Exit(1)
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	if err := run(listens, flag.Args(), *encrypt, *direct, *trim); err != nil {
		fmt.Fprintln(os.Stderr, "plainserve:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

func run(listens, files []string, encrypt, direct, trim bool) error {
	if len(listens) == 0 || len(files) == 0 {
		return fmt.Errorf("usage: plainserve -listen SPEC [-listen SPEC] [-encrypt] FILE...")
	}
	var ls []net.Listener
	for _, spec := range listens {
		l, err := nbd.Listen(spec)
		if err != nil {
			return err
		}
		ls = append(ls, l)
	}
	log := slog.New(linelog.New(os.Stderr, "plainserve", nil))
	srv := nbd.NewServer(nbd.ServerConfig{Logger: log})
	var devs []blockdev.Device
	defer func() {
		for _, d := range devs {
			d.Close()
		}
	}()
	for _, path := range files {
		f, err := blockdev.OpenFile(path, blockdev.FileOptions{Direct: direct})
		if err != nil {
			return err
		}
		var dev blockdev.Device = f
		if encrypt {
			key := make([]byte, 64)
			rand.Read(key)
			c, err := blockcrypt.New(f, blockcrypt.Config{Key: key, AllowDiscards: trim})
			clear(key)
			if err != nil {
				f.Close()
				return fmt.Errorf("%s: %w", path, err)
			}
			dev = c
		}
		devs = append(devs, dev)
		name := ""
		if len(files) > 1 {
			name = filepath.Base(path)
		}
		if err := srv.AddExport(nbd.Export{Name: name, Description: path, Device: dev, SharedWriters: true}); err != nil {
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// The lifecycle of atrest serve's (package serving): the listeners exist, so a
	// client that connects once "ready" is printed is served.
	return serving.Run(ctx, srv, serving.Options{
		Listeners: ls, Logger: log,
		Ready: func(context.Context) (string, error) {
			fmt.Println("ready")
			return fmt.Sprintf("serving %d export(s)", len(srv.Exports())), nil
		},
	})
}
