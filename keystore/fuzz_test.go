package keystore

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// FuzzParseState: ParseState never panics, and a state it accepts marshals to a file
// that parses to the same state (the format is stable under rewrite).
func FuzzParseState(f *testing.F) {
	for _, name := range []string{"golden-v1", "golden-v1-rotating"} {
		if b, err := os.ReadFile(filepath.Join("testdata", name, StateFile)); err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseState(b)
		if err != nil {
			return
		}
		out := s.Marshal()
		s2, err := ParseState(out)
		if err != nil {
			t.Fatalf("marshalled state does not parse: %v\n%s", err, out)
		}
		if !bytes.Equal(s2.Marshal(), out) {
			t.Fatal("marshal is not stable")
		}
	})
}
