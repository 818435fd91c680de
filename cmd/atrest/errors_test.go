package main

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/atrest/atrest/internal/exitcodes"
)

func TestReport(t *testing.T) {
	base := errors.New("master.key is readable by group")
	cases := []struct {
		name     string
		err      error
		code     int
		contains []string
	}{
		{"nil", nil, exitcodes.OK, nil},
		{"plain", errors.New("boom"), exitcodes.Failure, []string{"atrest: boom\n"}},
		{"with hint", fail(exitcodes.Keystore, base, "chmod 600 master.key"), exitcodes.Keystore,
			[]string{"atrest: master.key is readable by group\n", "hint: chmod 600 master.key\n"}},
		{"wrapped twice", fmt.Errorf("open keystore: %w", fail(exitcodes.Key, base, "")), exitcodes.Key,
			[]string{"atrest: open keystore: master.key"}},
		{"usage", usagef("missing PATH"), exitcodes.Usage, []string{"atrest: missing PATH\n", "hint: "}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var out bytes.Buffer
			if got := report(&out, c.err); got != c.code {
				t.Errorf("exit code %d, want %d", got, c.code)
			}
			if c.err == nil && out.Len() != 0 {
				t.Errorf("printed %q for no error", out.String())
			}
			for _, s := range c.contains {
				if !strings.Contains(out.String(), s) {
					t.Errorf("output %q lacks %q", out.String(), s)
				}
			}
		})
	}
	if fail(exitcodes.IO, nil, "x") != nil {
		t.Error("fail(nil) is not nil")
	}
}

func TestAge(t *testing.T) {
	for sec, want := range map[int64]string{0: "0s", 59: "59s", 60: "1m 0s", 3599: "59m 59s", 3600: "1h 0m", 86399: "23h 59m", 90000: "1d 1h", -3: "0s"} {
		if got := age(sec); got != want {
			t.Errorf("age(%d) = %q, want %q", sec, got, want)
		}
	}
}
