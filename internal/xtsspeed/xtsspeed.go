// Package xtsspeed measures the XTS-AES-256 throughput of each implementation in
// package blockcrypt against golang.org/x/crypto/xts and `openssl speed` (`atrest
// speed`). It lives apart from blockcrypt so that the data path carries no benchmark
// code and no dependency on x/crypto/xts. Measurements lock their goroutine to a thread
// and count its CPU time; the functions may run concurrently but then measure each
// other's load.
package xtsspeed

import (
	"bufio"
	"bytes"
	"context"
	"crypto/aes"
	"fmt"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/xts"
	"golang.org/x/sys/unix"

	"github.com/atrest/atrest/blockcrypt"
)

// Result is one throughput measurement of XTS-AES-256 (`atrest speed`).
type Result struct {
	// Impl is an implementation name (blockcrypt.Implementations), XCryptoName or
	// OpenSSLName.
	Impl string `json:"impl"`
	// Op is "encrypt" or "decrypt".
	Op string `json:"op"`
	// Size is the number of bytes per call.
	Size int `json:"size"`
	// GBps is the throughput in GB/s (10^9 bytes per second) on one core.
	GBps float64 `json:"gbps"`
}

const (
	// XCryptoName is the Impl of golang.org/x/crypto/xts in speed results.
	XCryptoName = "x/crypto/xts"
	// OpenSSLName is the Impl of `openssl speed -evp aes-256-xts` in speed results.
	OpenSSLName = "openssl"
)

// Sizes are the request sizes `atrest speed` measures by default: one 512-byte sector,
// one 4096-byte sector, and 16 of them.
var Sizes = []int{512, 4096, 64 << 10}

// Measure measures the XTS throughput on one core of every implementation this CPU
// can run and of golang.org/x/crypto/xts, encrypting and decrypting buffers of each
// size in place (sizes below 4096 as 512-byte sectors, others as 4096-byte sectors, which
// must divide them). Each case runs for about perCase of CPU time on one locked thread
// and reports bytes per CPU second, the measure `openssl speed` uses. It stops early

// InUse names the XTS implementation atrest uses on this CPU (the fastest it has).
func InUse() string {
	if impls := blockcrypt.Implementations(); len(impls) > 0 {
		return impls[0]
	}
	return ""
}

// when ctx is done.
func Measure(ctx context.Context, sizes []int, perCase time.Duration) ([]Result, error) {
	for _, size := range sizes {
		if size <= 0 || size%512 != 0 || (size > 4096 && size%4096 != 0) {
			return nil, fmt.Errorf("speed: size %d is not a whole number of sectors (512, 4096, or a multiple of 4096)", size)
		}
	}
	if perCase <= 0 {
		return nil, fmt.Errorf("speed: duration per case %v is not positive", perCase)
	}
	// A fixed key: speed does not depend on it, and no secret is involved.
	key := make([]byte, blockcrypt.KeySize)
	for i := range key {
		key[i] = byte(i)
	}
	ref, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return nil, fmt.Errorf("speed: %w", err)
	}
	var results []Result
	for _, size := range sizes {
		ss := 4096
		if size < 4096 {
			ss = 512
		}
		buf := make([]byte, size)
		for _, op := range []string{"encrypt", "decrypt"} {
			for _, impl := range blockcrypt.Implementations() {
				c, err := blockcrypt.NewCipherImpl(impl, key)
				if err != nil {
					return nil, fmt.Errorf("speed: %w", err)
				}
				f := func() { c.EncryptSectors(buf, buf, ss, 1) }
				if op == "decrypt" {
					f = func() { c.DecryptSectors(buf, buf, ss, 1) }
				}
				gbps, err := measure(ctx, f, size, perCase)
				c.Close()
				if err != nil {
					return nil, err
				}
				results = append(results, Result{Impl: impl, Op: op, Size: size, GBps: gbps})
			}
			crypt := ref.Encrypt
			if op == "decrypt" {
				crypt = ref.Decrypt
			}
			f := func() {
				for o := 0; o < size; o += ss {
					crypt(buf[o:o+ss], buf[o:o+ss], uint64(1+o/512))
				}
			}
			gbps, err := measure(ctx, f, size, perCase)
			if err != nil {
				return nil, err
			}
			results = append(results, Result{Impl: XCryptoName, Op: op, Size: size, GBps: gbps})
		}
	}
	return results, nil
}

// measure runs f (which processes size bytes) for about d of CPU time and returns the
// throughput in GB/s over that CPU time. Like `openssl speed`, which divides by the user
// CPU time of its process, it counts the CPU time of the measuring thread rather than
// wall-clock time, so that both sides of a comparison run on a shared, loaded machine
// are timed the same way.
func measure(ctx context.Context, f func(), size int, d time.Duration) (float64, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	f() // warm up caches and the buffer
	n := 0
	start, err := threadCPUTime()
	if err != nil {
		return 0, err
	}
	var elapsed time.Duration
	for batch := 1; ; batch = min(batch*2, 1<<16) {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		for range batch {
			f()
		}
		n += batch
		now, err := threadCPUTime()
		if err != nil {
			return 0, err
		}
		if elapsed = now - start; elapsed >= d {
			break
		}
	}
	return float64(n) * float64(size) / elapsed.Seconds() / 1e9, nil
}

// threadCPUTime is the CPU time the calling OS thread has used.
func threadCPUTime() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0, fmt.Errorf("speed: thread CPU clock: %w", err)
	}
	return time.Duration(ts.Nano()), nil
}

// OpenSSL runs `openssl speed -evp aes-256-xts` at each size for the given whole
// number of seconds, encrypting, and decrypting too if decrypt is set, and returns its
// figures as Results with Impl OpenSSLName. openssl encrypts each buffer as one XTS
// data unit (one tweak), where Measure uses 4096-byte sectors above 4096 bytes.
func OpenSSL(ctx context.Context, openssl string, sizes []int, seconds int, decrypt bool) ([]Result, error) {
	ops := []string{"encrypt"}
	if decrypt {
		ops = append(ops, "decrypt")
	}
	var results []Result
	for _, op := range ops {
		for _, size := range sizes {
			args := []string{"speed", "-mr", "-evp", "aes-256-xts", "-bytes", strconv.Itoa(size), "-seconds", strconv.Itoa(seconds)}
			if op == "decrypt" {
				args = append(args, "-decrypt")
			}
			var stdout, stderr bytes.Buffer
			cmd := exec.CommandContext(ctx, openssl, args...)
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				return results, fmt.Errorf("%s %s: %w: %s", openssl, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
			}
			rates, err := parseOpenSSLSpeed(stdout.String())
			if err != nil {
				return results, fmt.Errorf("%s %s: %w", openssl, strings.Join(args, " "), err)
			}
			rate, ok := rates[size]
			if !ok {
				return results, fmt.Errorf("%s %s: no result for %d bytes in its output", openssl, strings.Join(args, " "), size)
			}
			results = append(results, Result{Impl: OpenSSLName, Op: op, Size: size, GBps: rate / 1e9})
		}
	}
	return results, nil
}

// parseOpenSSLSpeed reads the machine-readable output of `openssl speed -mr -evp
// aes-256-xts`: "+H:size:size..." names the sizes and "+F:n:AES-256-XTS:rate:rate..."
// gives bytes per second for each (the -mr form prints plain bytes per second; the
// human form prints thousands of bytes per second with a "k").
func parseOpenSSLSpeed(out string) (map[int]float64, error) {
	var sizes []int
	rates := map[int]float64{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		fields := strings.Split(strings.TrimSpace(sc.Text()), ":")
		switch fields[0] {
		case "+H":
			sizes = sizes[:0]
			for _, f := range fields[1:] {
				n, err := strconv.Atoi(f)
				if err != nil || n <= 0 {
					return nil, fmt.Errorf("openssl speed output: bad size %q in %q", f, sc.Text())
				}
				sizes = append(sizes, n)
			}
		case "+F":
			if len(fields) < 3 || !strings.EqualFold(fields[2], "AES-256-XTS") {
				continue
			}
			vals := fields[3:]
			if len(vals) != len(sizes) {
				return nil, fmt.Errorf("openssl speed output: %d rates for %d sizes in %q", len(vals), len(sizes), sc.Text())
			}
			for i, v := range vals {
				r, err := strconv.ParseFloat(v, 64)
				if err != nil || r <= 0 {
					return nil, fmt.Errorf("openssl speed output: bad rate %q in %q", v, sc.Text())
				}
				rates[sizes[i]] = r
			}
		}
	}
	if len(rates) == 0 {
		return nil, fmt.Errorf("openssl speed output has no AES-256-XTS result")
	}
	return rates, nil
}
