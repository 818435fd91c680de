package main

import (
	"fmt"
	"os"
	"strings"
)

// The README's benchmark section lies between these lines; a run that writes
// docs/bench rewrites it.
const (
	readmeBegin = "<!-- benchrun: begin (bench/run.sh writes this section) -->"
	readmeEnd   = "<!-- benchrun: end -->"
)

// updateREADME replaces the section between the markers with section.
func updateREADME(path, section string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	text := string(b)
	i := strings.Index(text, readmeBegin)
	j := strings.Index(text, readmeEnd)
	if i < 0 || j < i {
		return fmt.Errorf("%s has no benchmark section (%q ... %q)", path, readmeBegin, readmeEnd)
	}
	text = text[:i+len(readmeBegin)] + "\n" + section + text[j:]
	return os.WriteFile(path, []byte(text), 0o644)
}

// withoutSection is the README without the benchmark section's content.
func withoutSection(text string) string {
	i := strings.Index(text, readmeBegin)
	j := strings.Index(text, readmeEnd)
	if i < 0 || j < i {
		return text
	}
	return text[:i] + text[j:]
}
