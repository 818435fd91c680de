package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/atrest/atrest/blockcrypt"
	"github.com/atrest/atrest/internal/testutil"
	"github.com/atrest/atrest/internal/xtsspeed"
)

// TestSpeedJSON runs `atrest speed --json` briefly (hidden flags) and checks the schema:
// a list of {"impl","op","size","gbps"} with a row for every implementation, for
// x/crypto/xts and for OpenSSL, encrypting and decrypting.
func TestSpeedJSON(t *testing.T) {
	testutil.Tool(t, "openssl")
	var out, errOut bytes.Buffer
	app := newApp()
	app.Writer, app.ErrWriter = &out, &errOut
	if err := app.Run([]string{"atrest", "speed", "--json", "--duration", "15ms", "--sizes", "4096"}); err != nil {
		t.Fatalf("atrest speed: %v\n%s", err, errOut.String())
	}
	var rows []map[string]any
	dec := json.NewDecoder(bytes.NewReader(out.Bytes()))
	if err := dec.Decode(&rows); err != nil {
		t.Fatalf("output is not a JSON list: %v\n%s", err, out.String())
	}
	seen := map[string]bool{}
	for _, r := range rows {
		if len(r) != 4 {
			t.Errorf("row %v: want exactly impl, op, size, gbps", r)
		}
		impl, _ := r["impl"].(string)
		op, _ := r["op"].(string)
		size, _ := r["size"].(float64)
		gbps, _ := r["gbps"].(float64)
		if impl == "" || (op != "encrypt" && op != "decrypt") || size != 4096 || !(gbps > 0) {
			t.Errorf("bad row %v", r)
		}
		seen[impl+" "+op] = true
	}
	impls := append(blockcrypt.Implementations(), xtsspeed.XCryptoName, xtsspeed.OpenSSLName)
	for _, impl := range impls {
		for _, op := range []string{"encrypt", "decrypt"} {
			if !seen[impl+" "+op] {
				t.Errorf("no row for %s %s", impl, op)
			}
		}
	}
	if len(rows) != 2*len(impls) {
		t.Errorf("%d rows, want %d", len(rows), 2*len(impls))
	}
}

func TestPrintSpeed(t *testing.T) {
	results := []xtsspeed.Result{
		{Impl: "fast", Op: "encrypt", Size: 512, GBps: 10},
		{Impl: "fast", Op: "encrypt", Size: 4096, GBps: 12},
		{Impl: "fast", Op: "decrypt", Size: 512, GBps: 9},
		{Impl: "fast", Op: "decrypt", Size: 4096, GBps: 11},
		{Impl: "x/crypto/xts", Op: "encrypt", Size: 512, GBps: 0.4},
		{Impl: "openssl", Op: "encrypt", Size: 512, GBps: 5},
		{Impl: "openssl", Op: "encrypt", Size: 4096, GBps: 6},
	}
	var out bytes.Buffer
	if err := printSpeed(&out, results, []int{512, 4096}, "a note", "OpenSSL 9.9"); err != nil {
		t.Fatal(err)
	}
	s := out.String()
	for _, want := range []string{
		"512 B", "4 KiB",
		"fast            encrypt  10.00 (2.00x)  12.00 (2.00x)",
		"fast            decrypt  9.00           11.00",
		"x/crypto/xts    encrypt  0.40 (0.08x)   -",
		"openssl         encrypt  5.00           6.00",
		"OpenSSL: OpenSSL 9.9", "Note: a note",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("output lacks %q:\n%s", want, s)
		}
	}
	if strings.Index(s, "fast            decrypt") > strings.Index(s, "x/crypto/xts") {
		t.Errorf("rows not grouped by implementation:\n%s", s)
	}
}

func TestSpeedUsage(t *testing.T) {
	app := newApp()
	var out bytes.Buffer
	app.Writer, app.ErrWriter = &out, &out
	if err := app.Run([]string{"atrest", "speed", "extra"}); err == nil {
		t.Error("an argument was accepted")
	}
	if err := app.Run([]string{"atrest", "speed", "--sizes", "100", "--duration", "1ms"}); err == nil || !strings.Contains(err.Error(), "size 100") {
		t.Errorf("a bad size: %v", err)
	}
}
