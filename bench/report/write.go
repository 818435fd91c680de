package report

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// Files written by Write, besides the charts.
const (
	JSONFile     = "results.json"
	MarkdownFile = "report.md"
)

// Write analyses the report and writes its JSON (with the Summary), its Markdown and
// its charts into dir, replacing the charts an earlier report left there.
func Write(dir string, r *Report) error {
	r.Schema = SchemaVersion
	s := Analyze(r)
	r.Summary = s
	defer func() { r.Summary = nil }()
	charts, err := Charts(r, s)
	if err != nil {
		return err
	}
	var md bytes.Buffer
	if err := Markdown(&md, r, s, charts); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, c := range chartList {
		if err := os.Remove(filepath.Join(dir, c.file)); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	files := map[string][]byte{JSONFile: append(js, '\n'), MarkdownFile: md.Bytes()}
	for name, b := range charts {
		files[name] = b
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return fmt.Errorf("write the report: %w", err)
		}
	}
	return nil
}
