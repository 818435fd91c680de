package xtsspeed

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/internal/testutil"
)

func TestParseOpenSSL(t *testing.T) {
	// Output of OpenSSL 3.0 `openssl speed -mr -evp aes-256-xts -bytes 512 -seconds 1`.
	out := "+DT:AES-256-XTS:1:512\n+R:10091623:AES-256-XTS:0.990000\n" +
		"version: 3.0.22\nbuilt on: Mon Aug 25 00:00:00 2026 UTC\n" +
		"+H:512\n+F:25:AES-256-XTS:5219101995.96\n"
	rates, err := parseOpenSSLSpeed(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(rates) != 1 || rates[512] != 5219101995.96 {
		t.Errorf("rates = %v", rates)
	}
	multi := "+H:16:64:256\n+F:25:AES-256-XTS:1000.00:2000.50:3000.00\n"
	rates, err = parseOpenSSLSpeed(multi)
	if err != nil || rates[16] != 1000 || rates[64] != 2000.5 || rates[256] != 3000 {
		t.Errorf("multi: %v, %v", rates, err)
	}
	for _, bad := range []string{
		"",
		"The 'numbers' are in 1000s of bytes per second processed.\nAES-256-XTS 6773985.49k\n",
		"+H:512:4096\n+F:25:AES-256-XTS:1.0\n",
		"+H:x\n+F:25:AES-256-XTS:1.0\n",
		"+H:512\n+F:25:AES-256-XTS:fast\n",
	} {
		if _, err := parseOpenSSLSpeed(bad); err == nil {
			t.Errorf("parsed %q", bad)
		}
	}
}

// TestOpenSSL runs the real openssl briefly and checks that its figures parse.
func TestOpenSSL(t *testing.T) {
	openssl := testutil.Tool(t, "openssl")
	res, err := OpenSSL(context.Background(), openssl, []int{4096}, 1, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 2 || res[0].Op != "encrypt" || res[1].Op != "decrypt" {
		t.Fatalf("results %+v", res)
	}
	for _, r := range res {
		if r.Impl != OpenSSLName || r.Size != 4096 || !(r.GBps > 0.01 && r.GBps < 1000) {
			t.Errorf("implausible result %+v", r)
		}
	}
	if _, err := OpenSSL(context.Background(), "/nonexistent/openssl", []int{512}, 1, false); err == nil {
		t.Error("a missing openssl gave no error")
	}
}

func TestMeasure(t *testing.T) {
	res, err := Measure(context.Background(), []int{512, 8192}, 3*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	want := 2 * 2 * (len(blockcrypt.Implementations()) + 1)
	if len(res) != want {
		t.Fatalf("%d results, want %d", len(res), want)
	}
	seen := map[Result]bool{}
	for _, r := range res {
		if r.GBps <= 0 || (r.Op != "encrypt" && r.Op != "decrypt") || (r.Size != 512 && r.Size != 8192) {
			t.Errorf("bad result %+v", r)
		}
		key := Result{Impl: r.Impl, Op: r.Op, Size: r.Size}
		if seen[key] {
			t.Errorf("duplicate %+v", key)
		}
		seen[key] = true
	}
	if !seen[Result{Impl: XCryptoName, Op: "decrypt", Size: 8192}] || !seen[Result{Impl: "purego", Op: "encrypt", Size: 512}] {
		t.Errorf("missing rows in %+v", res)
	}
	for _, bad := range []int{0, -512, 100, 4096 + 512, 6144} {
		if _, err := Measure(context.Background(), []int{bad}, time.Millisecond); err == nil {
			t.Errorf("size %d accepted", bad)
		}
	}
	for _, d := range []time.Duration{0, -time.Millisecond} {
		if _, err := Measure(context.Background(), []int{512}, d); err == nil || !strings.Contains(err.Error(), "not positive") {
			t.Errorf("duration %v per case: %v, want a refusal", d, err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Measure(ctx, []int{512}, time.Second); err == nil {
		t.Error("a cancelled context did not stop the measurement")
	}
}
