package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/atrest/atrest/internal/exitcodes"
	"github.com/atrest/atrest/internal/xtsspeed"
)

type speedOptions struct {
	json    bool
	perCase time.Duration // per implementation, operation and size
	sizes   []int
	openssl string // path of openssl, "" to leave it out
	out     io.Writer
	errOut  io.Writer
}

// defaultPerCase keeps the whole command near 15 s on a machine with four XTS
// implementations: 5 Go rows × 3 sizes × 2 operations × 0.3 s, plus 6 one-second
// openssl runs.
const defaultPerCase = 300 * time.Millisecond

func init() {
	register(&cli.Command{
		Name:  "speed",
		Usage: "measure XTS-AES-256 throughput of each implementation against golang.org/x/crypto/xts and OpenSSL",
		Description: "Measures, on one core of this machine, every XTS implementation atrest has for the CPU,\n" +
			"golang.org/x/crypto/xts and, where openssl is installed, `openssl speed -evp aes-256-xts`,\n" +
			"at 512 B, 4 KiB and 64 KiB, encrypting and decrypting, and prints GB/s (10^9 bytes/s)\n" +
			"with the ratio to OpenSSL at the same size. Takes about 15 seconds.",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: `print a JSON list of {"impl","op","size","gbps"}`},
			&cli.DurationFlag{Name: "duration", Value: defaultPerCase, Hidden: true, Usage: "time per implementation, operation and size (tests)"},
			&cli.IntSliceFlag{Name: "sizes", Hidden: true, Usage: "request sizes in bytes (tests)"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 0 {
				return usagef("speed takes no arguments")
			}
			o := speedOptions{
				json:    c.Bool("json"),
				perCase: c.Duration("duration"),
				sizes:   c.IntSlice("sizes"),
				out:     c.App.Writer,
				errOut:  c.App.ErrWriter,
			}
			if len(o.sizes) == 0 {
				o.sizes = xtsspeed.Sizes
			}
			if o.perCase <= 0 {
				return usagef("--duration must be positive")
			}
			if p, err := exec.LookPath("openssl"); err == nil {
				o.openssl = p
			}
			return runSpeed(c.Context, o)
		},
	})
}

func runSpeed(ctx context.Context, o speedOptions) error {
	results, err := xtsspeed.Measure(ctx, o.sizes, o.perCase)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return fail(exitcodes.Failure, err, "")
		}
		return usageError(err)
	}
	note := ""
	if o.openssl == "" {
		note = "openssl is not installed: no comparison with OpenSSL"
	} else {
		ssl, err := xtsspeed.OpenSSL(ctx, o.openssl, o.sizes, 1, true)
		results = append(results, ssl...)
		if err != nil {
			if ctx.Err() != nil {
				return fail(exitcodes.Failure, ctx.Err(), "")
			}
			note = fmt.Sprintf("openssl speed failed, so some ratios are missing: %v", err)
		}
	}
	if o.json {
		if note != "" {
			fmt.Fprintf(o.errOut, "atrest: %s\n", note)
		}
		b, err := json.MarshalIndent(results, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(o.out, "%s\n", b)
		return err
	}
	return printSpeed(o.out, results, o.sizes, note, opensslVersion(ctx, o.openssl))
}

// printSpeed prints one row per implementation and operation, one column per size, with
// the ratio to OpenSSL in brackets.
func printSpeed(w io.Writer, results []xtsspeed.Result, sizes []int, note, sslVersion string) error {
	type key struct {
		impl, op string
		size     int
	}
	gbps := map[key]float64{}
	var rows []key // impl and op, in the order measured
	for _, r := range results {
		k := key{r.Impl, r.Op, 0}
		if _, ok := gbps[k]; !ok {
			gbps[k] = 0
			rows = append(rows, k)
		}
		gbps[key{r.Impl, r.Op, r.Size}] = r.GBps
	}
	// Group the rows by implementation: encrypt, then decrypt.
	var ordered []key
	for _, r := range rows {
		if r.op == "encrypt" {
			ordered = append(ordered, r)
			if _, ok := gbps[key{r.impl, "decrypt", 0}]; ok {
				ordered = append(ordered, key{r.impl, "decrypt", 0})
			}
		}
	}
	fmt.Fprintln(w, "XTS-AES-256 on one core, GB/s (10^9 bytes/s), with the ratio to OpenSSL at the same size")
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprint(tw, "IMPLEMENTATION\tOP")
	for _, s := range sizes {
		fmt.Fprintf(tw, "\t%s", sizeLabel(s))
	}
	fmt.Fprintln(tw)
	for _, r := range ordered {
		fmt.Fprintf(tw, "%s\t%s", r.impl, r.op)
		for _, s := range sizes {
			v, ok := gbps[key{r.impl, r.op, s}]
			if !ok {
				fmt.Fprint(tw, "\t-")
				continue
			}
			cell := fmt.Sprintf("%.2f", v)
			if ssl, ok := gbps[key{xtsspeed.OpenSSLName, r.op, s}]; ok && r.impl != xtsspeed.OpenSSLName {
				cell += fmt.Sprintf(" (%.2fx)", v/ssl)
			}
			fmt.Fprintf(tw, "\t%s", cell)
		}
		fmt.Fprintln(tw)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	if impl := xtsspeed.InUse(); impl != "" {
		fmt.Fprintf(w, "atrest uses %s on this CPU.\n", impl)
	}
	if sslVersion != "" {
		fmt.Fprintf(w, "OpenSSL: %s, `openssl speed -evp aes-256-xts`, one XTS data unit per buffer.\n", sslVersion)
	}
	if note != "" {
		fmt.Fprintf(w, "Note: %s\n", note)
	}
	return nil
}

func sizeLabel(n int) string {
	if n >= 1024 && n%1024 == 0 {
		return fmt.Sprintf("%d KiB", n/1024)
	}
	return fmt.Sprintf("%d B", n)
}

// opensslVersion returns the first line of `openssl version`, or "".
func opensslVersion(ctx context.Context, openssl string) string {
	if openssl == "" {
		return ""
	}
	out, err := exec.CommandContext(ctx, openssl, "version").Output()
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}
