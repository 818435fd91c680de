package keystore

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// FuzzParseState: ParseState never panics; a state it accepts marshals to a file that
// parses to the same state (the format is stable under rewrite), and one of version 1
// does so both as version 1 (its drives kept) and as the version 2 its migration writes.
func FuzzParseState(f *testing.F) {
	for _, name := range []string{"golden-v1", "golden-v1-rotating", "golden-v2", "golden-v2-rotating"} {
		if b, err := os.ReadFile(filepath.Join("testdata", name, StateFile)); err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		s, drives, err := ParseState(b)
		if err != nil {
			return
		}
		if s.Version == FormatVersion1 {
			out := marshalV1(s, drives)
			s1, d1, err := ParseState(out)
			if err != nil {
				t.Fatalf("marshalled version 1 does not parse: %v\n%s", err, out)
			}
			if !bytes.Equal(marshalV1(s1, d1), out) {
				t.Fatal("version 1 marshal is not stable")
			}
			s.Version = FormatVersion
		}
		out := s.Marshal()
		s2, d2, err := ParseState(out)
		if err != nil || d2 != nil {
			t.Fatalf("marshalled state does not parse: %v\n%s", err, out)
		}
		if !bytes.Equal(s2.Marshal(), out) {
			t.Fatal("marshal is not stable")
		}
	})
}
