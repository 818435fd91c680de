package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/atrest/atrest/node"
	"github.com/atrest/atrest/node/nodetest"
)

// openapi is the part of an OpenAPI 3 document that the tests read.
type openapi struct {
	Paths      map[string]map[string]operation `json:"paths"`
	Components struct {
		Schemas   map[string]schema   `json:"schemas"`
		Responses map[string]response `json:"responses"`
	} `json:"components"`
}

type operation struct {
	Responses map[string]response `json:"responses"`
}

type response struct {
	Ref     string `json:"$ref"`
	Content map[string]struct {
		Schema schema `json:"schema"`
	} `json:"content"`
}

// schema is the subset of JSON Schema the document uses (schemaKeywords); the checker
// refuses a document that uses more, so that nothing in it goes unchecked.
type schema map[string]any

var schemaKeywords = []string{"$ref", "allOf", "type", "format", "nullable", "enum", "required", "properties", "additionalProperties", "items", "description"}

func loadOpenAPI(t *testing.T) *openapi {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "api", "openapi.json"))
	if err != nil {
		t.Fatal(err)
	}
	var doc openapi
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("docs/api/openapi.json: %v", err)
	}
	return &doc
}

// TestOpenAPIRoutes: the document and the server's mux have the same routes with the
// same methods: every documented operation is routed, every other method of a
// documented path is refused with 405, and every route is documented.
func TestOpenAPIRoutes(t *testing.T) {
	doc := loadOpenAPI(t)
	s := NewServer(nil, nil)
	var documented, served []string
	for path, ops := range doc.Paths {
		example := path
		for _, p := range []string{"{id}", "{name}"} {
			example = strings.ReplaceAll(example, p, "x0123456789")
		}
		for _, m := range []string{"GET", "POST", "PUT", "PATCH", "DELETE"} {
			_, ok := ops[strings.ToLower(m)]
			r, _ := http.NewRequest(m, "http://x"+example, nil)
			_, pattern := s.mux.Handler(r)
			if want := m + " " + path; ok && pattern != want {
				t.Errorf("%s %s is documented; the mux routes it to %q", m, path, pattern)
			} else if !ok && pattern != "" {
				t.Errorf("%s %s is routed (%q) and not documented", m, path, pattern)
			}
		}
		for m := range ops {
			documented = append(documented, strings.ToUpper(m)+" "+path)
		}
	}
	for _, rt := range routes {
		served = append(served, rt.method+" "+rt.path)
	}
	sort.Strings(documented)
	sort.Strings(served)
	if !slices.Equal(documented, served) {
		t.Errorf("documented:\n%s\nserved:\n%s", strings.Join(documented, "\n"), strings.Join(served, "\n"))
	}
}

// TestOpenAPIResponses: the answers of a real node, serving a drive, to every endpoint
// (and errors of each kind) validate against the document's schemas.
func TestOpenAPIResponses(t *testing.T) {
	doc := loadOpenAPI(t)
	for name, sc := range doc.Components.Schemas {
		checkKeywords(t, "#/components/schemas/"+name, sc)
	}
	n, dir := nodetest.New(t)
	a := addDrive(t, n, dir, "alpha")
	if err := n.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	sock, c := serveAPI(t, n)

	es, err := c.Events(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer es.Close()
	img := filepath.Join(dir, "new.img")
	add, _ := json.Marshal(node.AddDriveRequest{Path: img, Volume: "new", Create: 32 << 20})
	for _, tc := range []struct {
		method, path, pattern string
		body                  []byte
		status                int
	}{
		{"GET", "/v1/identity", "", nil, 200},
		{"GET", "/v1/encryption/status", "", nil, 200},
		{"GET", "/v1/node/status", "", nil, 200},
		{"POST", "/v1/encryption/rotate-keys", "", []byte(`{"force": false}`), 200},
		{"POST", "/v1/encryption/rotate-keys", "", nil, 200},
		{"GET", "/v1/encryption/status", "", nil, 200},
		{"GET", "/v1/node/status", "", nil, 200}, // with a rotation time
		{"POST", "/v1/drives", "", add, 201},
		{"POST", "/v1/drives", "", add, 409},
		{"POST", "/v1/drives", "", []byte(`{"path": "x"}`), 400},
		{"GET", "/v1/drives", "", nil, 200},
		{"GET", "/v1/drives/" + a.Drive.UUID[:8], "/v1/drives/{id}", nil, 200},
		{"GET", "/v1/drives/" + url.PathEscape(a.Drive.Path), "/v1/drives/{id}", nil, 200},
		{"GET", "/v1/drives/0123456789", "/v1/drives/{id}", nil, 404},
		{"GET", "/v1/volumes", "", nil, 200},
		{"GET", "/v1/volumes/alpha", "/v1/volumes/{name}", nil, 200},
		{"GET", "/v1/volumes/nothing", "/v1/volumes/{name}", nil, 404},
		{"GET", "/v1/volumes/a%2Fb", "/v1/volumes/{name}", nil, 400},
	} {
		ctype := ""
		if tc.body != nil {
			ctype = "application/json"
		}
		status, h, body := call(t, sock, tc.method, tc.path, ctype, tc.body)
		if status != tc.status {
			t.Errorf("%s %s: %d %s, want %d", tc.method, tc.path, status, body, tc.status)
			continue
		}
		pattern := tc.pattern
		if pattern == "" {
			pattern = tc.path
		}
		sc := responseSchema(t, doc, tc.method, pattern, status, h.Get("Content-Type"))
		if sc == nil {
			continue
		}
		for _, err := range validateJSON(doc, body, sc) {
			t.Errorf("%s %s (%d): %v\n%s", tc.method, tc.path, status, err, body)
		}
	}

	// The events the requests above caused, as the stream carries them.
	status, h, stream := callStream(t, sock, "/v1/events")
	if status != 200 {
		t.Fatalf("GET /v1/events: %d", status)
	}
	sc := responseSchema(t, doc, "GET", "/v1/events", status, h.Get("Content-Type"))
	for _, data := range stream {
		for _, err := range validateJSON(doc, []byte(data), sc) {
			t.Errorf("event %s: %v", data, err)
		}
	}
	if e, err := es.Next(); err != nil || e.Type == "" {
		t.Errorf("first event through the Client: %+v, %v", e, err)
	}
}

// callStream reads the events of a stream that has been subscribed to after a
// rotation: it starts one more and returns the data lines up to its end.
func callStream(t *testing.T, sock, path string) (int, http.Header, []string) {
	t.Helper()
	hc := rawClient(sock)
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://x" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	if !sc.Scan() || sc.Text() != ": subscribed" {
		t.Fatalf("the stream starts with %q", sc.Text())
	}
	done := make(chan error, 1)
	go func() {
		_, err := NewClient(sock).Rotate(t.Context(), node.RotateRequest{})
		done <- err
	}()
	var data []string
	for sc.Scan() {
		line := sc.Text()
		if d, ok := strings.CutPrefix(line, "data: "); ok {
			data = append(data, d)
			if strings.Contains(d, `"type":"`+node.EventRotationFinished+`"`) {
				break
			}
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, data
}

// responseSchema is the schema the document gives for an answer (the status's, or the
// default's for an error; a success must be documented by its own status).
func responseSchema(t *testing.T, doc *openapi, method, path string, status int, ctype string) schema {
	t.Helper()
	op, ok := doc.Paths[path][strings.ToLower(method)]
	if !ok {
		t.Errorf("%s %s is not documented", method, path)
		return nil
	}
	r, ok := op.Responses[strconv.Itoa(status)]
	if !ok && status >= 400 {
		r, ok = op.Responses["default"]
	}
	if !ok {
		t.Errorf("%s %s: status %d is not documented", method, path, status)
		return nil
	}
	if name, ok := strings.CutPrefix(r.Ref, "#/components/responses/"); ok {
		r = doc.Components.Responses[name]
	}
	mt := strings.TrimSpace(strings.Split(ctype, ";")[0])
	c, ok := r.Content[mt]
	if !ok {
		t.Errorf("%s %s: status %d with %s is not documented", method, path, status, mt)
		return nil
	}
	return c.Schema
}

func checkKeywords(t *testing.T, where string, sc schema) {
	t.Helper()
	for k, v := range sc {
		if !slices.Contains(schemaKeywords, k) {
			t.Errorf("%s: keyword %q: the schema checker does not know it", where, k)
		}
		switch k {
		case "properties":
			for name, p := range v.(map[string]any) {
				checkKeywords(t, where+"/"+name, p.(map[string]any))
			}
		case "items":
			checkKeywords(t, where+"/items", v.(map[string]any))
		case "allOf":
			for _, s := range v.([]any) {
				checkKeywords(t, where+"/allOf", s.(map[string]any))
			}
		}
	}
}

// validateJSON validates a JSON document against a schema of the document.
func validateJSON(doc *openapi, b []byte, sc schema) []error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return []error{err}
	}
	return validate(doc, "$", v, sc)
}

// validate checks v against sc: $ref, allOf, nullable, type, format date-time, enum,
// required, properties, additionalProperties false, items.
func validate(doc *openapi, at string, v any, sc schema) []error {
	if ref, ok := sc["$ref"].(string); ok {
		name := strings.TrimPrefix(ref, "#/components/schemas/")
		target, ok := doc.Components.Schemas[name]
		if !ok {
			return []error{fmt.Errorf("%s: no schema %s", at, ref)}
		}
		return validate(doc, at, v, target)
	}
	if v == nil {
		if sc["nullable"] == true {
			return nil
		}
		return []error{fmt.Errorf("%s: null, not nullable", at)}
	}
	var errs []error
	if all, ok := sc["allOf"].([]any); ok {
		for _, s := range all {
			errs = append(errs, validate(doc, at, v, s.(map[string]any))...)
		}
	}
	if e, ok := sc["enum"].([]any); ok && len(e) > 0 {
		found := false
		for _, x := range e {
			if fmt.Sprint(x) == fmt.Sprint(v) {
				found = true
			}
		}
		if !found {
			errs = append(errs, fmt.Errorf("%s: %v is not one of %v", at, v, e))
		}
	}
	typ, _ := sc["type"].(string)
	switch typ {
	case "":
	case "object":
		m, ok := v.(map[string]any)
		if !ok {
			return append(errs, fmt.Errorf("%s: %T, want an object", at, v))
		}
		props, _ := sc["properties"].(map[string]any)
		if req, ok := sc["required"].([]any); ok {
			for _, r := range req {
				if _, ok := m[r.(string)]; !ok {
					errs = append(errs, fmt.Errorf("%s: no property %q", at, r))
				}
			}
		}
		for k, x := range m {
			p, ok := props[k]
			if !ok {
				if sc["additionalProperties"] == false {
					errs = append(errs, fmt.Errorf("%s: property %q is not documented", at, k))
				}
				continue
			}
			errs = append(errs, validate(doc, at+"."+k, x, p.(map[string]any))...)
		}
	case "array":
		a, ok := v.([]any)
		if !ok {
			return append(errs, fmt.Errorf("%s: %T, want an array", at, v))
		}
		if items, ok := sc["items"].(map[string]any); ok {
			for i, x := range a {
				errs = append(errs, validate(doc, fmt.Sprintf("%s[%d]", at, i), x, items)...)
			}
		}
	case "string":
		s, ok := v.(string)
		if !ok {
			return append(errs, fmt.Errorf("%s: %T, want a string", at, v))
		}
		if sc["format"] == "date-time" {
			if _, err := time.Parse(time.RFC3339Nano, s); err != nil {
				errs = append(errs, fmt.Errorf("%s: %q is not RFC 3339", at, s))
			}
		}
	case "integer":
		n, ok := v.(json.Number)
		if _, err := n.Int64(); !ok || err != nil {
			errs = append(errs, fmt.Errorf("%s: %v, want an integer", at, v))
		}
	case "number":
		if _, ok := v.(json.Number); !ok {
			errs = append(errs, fmt.Errorf("%s: %T, want a number", at, v))
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			errs = append(errs, fmt.Errorf("%s: %T, want a boolean", at, v))
		}
	default:
		errs = append(errs, fmt.Errorf("%s: type %q: the checker does not know it", at, typ))
	}
	return errs
}

// TestValidate: the schema checker finds what it is for.
func TestValidate(t *testing.T) {
	doc := loadOpenAPI(t)
	es := doc.Components.Schemas["EncryptionStatus"]
	for _, tc := range []struct {
		json string
		errs int
	}{
		{`{"status":"Encrypted","type":"Local","last_key_rotation_time":null}`, 0},
		{`{"status":"Encrypted","type":"Local","last_key_rotation_time":"2026-01-02T03:04:05Z"}`, 0},
		{`{"status":"Encrypted","type":"Local"}`, 1},
		{`{"status":"Plain","type":"Local","last_key_rotation_time":null}`, 1},
		{`{"status":"Encrypted","type":"Local","last_key_rotation_time":"yesterday"}`, 1},
		{`{"status":"Encrypted","type":"Local","last_key_rotation_time":null,"extra":1}`, 1},
		{`{"status":1,"type":"Local","last_key_rotation_time":null}`, 2}, // type and enum
		{`[]`, 1},
		{`null`, 1},
	} {
		if errs := validateJSON(doc, []byte(tc.json), es); len(errs) != tc.errs {
			t.Errorf("%s: %v, want %d errors", tc.json, errs, tc.errs)
		}
	}
	ds := schema{"type": "array", "items": map[string]any{"$ref": "#/components/schemas/DriveStatus"}}
	if errs := validateJSON(doc, []byte(`[{"uuid": 1.5}]`), ds); len(errs) < 2 {
		t.Errorf("a drive with a bad uuid and no other field: %v", errs)
	}
	if errs := validateJSON(doc, []byte(`{"sector_size": 1.5}`), schema{"properties": map[string]any{"sector_size": map[string]any{"type": "integer"}}, "type": "object"}); len(errs) != 1 {
		t.Errorf("a fraction for an integer: %v", errs)
	}
}
