package luks2

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
)

// object is a JSON object of the metadata, kept as a generic tree so that fields
// atrest does not know survive a rewrite (specification §3: unknown objects are
// ignored but maintained). Numbers are json.Number.
type object = map[string]any

// Limits of the reference implementation on object counts.
const (
	maxKeyslots = 32
	maxTokens   = 32
	maxSegments = 32 // generous: atrest accepts one data segment
	maxDigests  = 32
)

// Keyslot is a read-only view of a keyslot object.
type Keyslot struct {
	ID       int
	Type     string // "luks2" for key-bearing slots
	KeySize  int    // bytes of the key stored in the slot
	Priority int    // 0 ignore, 1 normal (default), 2 high
	Area     Area
	KDF      KDF // luks2 slots only
	AF       AF  // luks2 slots only
	Digest   int // digest the slot is assigned to, -1 if none
}

// Area is the binary area of a keyslot.
type Area struct {
	Type       string // "raw" for luks2 slots
	Offset     int64  // from the start of the device
	Size       int64
	Encryption string // raw areas: dm-crypt notation, e.g. aes-xts-plain64
	KeySize    int    // raw areas: bytes of the area key
}

// KDF is the key derivation of a keyslot.
type KDF struct {
	Type       string // pbkdf2, argon2i or argon2id
	Salt       []byte
	Hash       string // pbkdf2
	Iterations int    // pbkdf2
	Time       int    // argon2: passes
	Memory     int    // argon2: KiB
	CPUs       int    // argon2: lanes
}

// AF is the anti-forensic splitter of a keyslot.
type AF struct {
	Type    string // luks1
	Stripes int
	Hash    string
}

// Segment is a read-only view of a segment object.
type Segment struct {
	ID         int
	Type       string // crypt
	Offset     int64
	Size       int64 // -1 when dynamic (to the end of the device)
	IVTweak    uint64
	Encryption string
	SectorSize int
	Flags      []string
	Integrity  bool
}

// Digest is a read-only view of a digest object.
type Digest struct {
	ID         int
	Type       string // pbkdf2
	Hash       string
	Iterations int
	Salt       []byte
	Value      []byte
	Keyslots   []int
	Segments   []int
}

// tokenView is what every token has; the rest of a token is free JSON.
type tokenView struct {
	ID       int
	Type     string
	Keyslots []int
	raw      object
}

// meta is the validated metadata of one header copy.
type meta struct {
	root         object
	keyslots     map[int]*Keyslot
	segments     map[int]*Segment
	digests      map[int]*Digest
	tokens       map[int]*tokenView
	jsonSize     int64
	keyslotsSize int64
	flags        []string
	requirements []string
}

// decodeJSON parses the JSON text of a header: exactly one object.
func decodeJSON(text []byte) (object, error) {
	d := json.NewDecoder(bytes.NewReader(text))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		return nil, fmt.Errorf("metadata is not valid JSON: %w", err)
	}
	if _, err := d.Token(); err != io.EOF {
		return nil, errors.New("metadata has trailing data after the JSON object")
	}
	root, ok := v.(object)
	if !ok {
		return nil, errors.New("metadata is not a JSON object")
	}
	return root, nil
}

// encodeJSON marshals the tree compactly (keys sorted, as encoding/json does).
func encodeJSON(root object) []byte {
	b, err := json.Marshal(root)
	if err != nil {
		panic("BUG: luks2: metadata tree does not marshal: " + err.Error())
	}
	return b
}

// field access helpers; each error names the path.

func getObject(o object, key, path string) (object, error) {
	v, ok := o[key]
	if !ok {
		return nil, fmt.Errorf("%s.%s is missing", path, key)
	}
	r, ok := v.(object)
	if !ok {
		return nil, fmt.Errorf("%s.%s is not an object", path, key)
	}
	return r, nil
}

func getString(o object, key, path string) (string, error) {
	v, ok := o[key]
	if !ok {
		return "", fmt.Errorf("%s.%s is missing", path, key)
	}
	s, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("%s.%s is not a string", path, key)
	}
	return s, nil
}

// getInt reads a JSON integer in [min, max].
func getInt(o object, key, path string, lo, hi int64) (int, error) {
	v, ok := o[key]
	if !ok {
		return 0, fmt.Errorf("%s.%s is missing", path, key)
	}
	n, ok := v.(json.Number)
	if !ok {
		return 0, fmt.Errorf("%s.%s is not a number", path, key)
	}
	i, err := strconv.ParseInt(string(n), 10, 64)
	if err != nil || i < lo || i > hi {
		return 0, fmt.Errorf("%s.%s = %s is not an integer in [%d, %d]", path, key, n, lo, hi)
	}
	return int(i), nil
}

// getU64 reads a string-uint64 (a decimal string, as 64-bit numbers are stored).
func getU64(o object, key, path string) (uint64, error) {
	s, err := getString(o, key, path)
	if err != nil {
		return 0, err
	}
	return parseU64(s, path+"."+key)
}

func parseU64(s, path string) (uint64, error) {
	if s == "" || len(s) > 20 || (len(s) > 1 && s[0] == '0') {
		return 0, fmt.Errorf("%s = %q is not a decimal uint64", path, s)
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%s = %q is not a decimal uint64", path, s)
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s = %q is not a decimal uint64", path, s)
	}
	return n, nil
}

// getOffset reads a string-uint64 that must fit an int64 (offsets and sizes).
func getOffset(o object, key, path string) (int64, error) {
	n, err := getU64(o, key, path)
	if err != nil {
		return 0, err
	}
	if n > 1<<62 {
		return 0, fmt.Errorf("%s.%s = %d is too large", path, key, n)
	}
	return int64(n), nil
}

func getBase64(o object, key, path string) ([]byte, error) {
	s, err := getString(o, key, path)
	if err != nil {
		return nil, err
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%s.%s is not base64: %w", path, key, err)
	}
	return b, nil
}

// getStrings reads an optional array of strings.
func getStrings(o object, key, path string) ([]string, error) {
	v, ok := o[key]
	if !ok {
		return nil, nil
	}
	a, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("%s.%s is not an array", path, key)
	}
	r := make([]string, 0, len(a))
	for i, e := range a {
		s, ok := e.(string)
		if !ok {
			return nil, fmt.Errorf("%s.%s[%d] is not a string", path, key, i)
		}
		r = append(r, s)
	}
	return r, nil
}

// getRefs reads a mandatory array of object names ("0", "1", ...).
func getRefs(o object, key, path string, max int) ([]int, error) {
	if _, ok := o[key]; !ok {
		return nil, fmt.Errorf("%s.%s is missing", path, key)
	}
	ss, err := getStrings(o, key, path)
	if err != nil {
		return nil, err
	}
	r := make([]int, 0, len(ss))
	for _, s := range ss {
		id, err := parseID(s, max)
		if err != nil {
			return nil, fmt.Errorf("%s.%s: %w", path, key, err)
		}
		if slices.Contains(r, id) {
			return nil, fmt.Errorf("%s.%s names %d twice", path, key, id)
		}
		r = append(r, id)
	}
	return r, nil
}

// parseID parses an object name: a decimal number below max.
func parseID(s string, max int) (int, error) {
	n, err := parseU64(s, "object name")
	if err != nil || n >= uint64(max) {
		return 0, fmt.Errorf("object name %q is not a number below %d", s, max)
	}
	return int(n), nil
}

// numbered returns the members of a numbered section (keyslots, tokens, ...) by id.
func numbered(root object, section string, max int) (map[int]object, error) {
	sec, err := getObject(root, section, "metadata")
	if err != nil {
		return nil, err
	}
	r := make(map[int]object, len(sec))
	for name, v := range sec {
		id, err := parseID(name, max)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", section, err)
		}
		o, ok := v.(object)
		if !ok {
			return nil, fmt.Errorf("%s.%s is not an object", section, name)
		}
		if _, err := getString(o, "type", section+"."+name); err != nil {
			return nil, err
		}
		r[id] = o
	}
	return r, nil
}

// parseMeta checks the JSON rules of the specification (and of cryptsetup's
// validation) for a header of hdrSize bytes, and builds the views. It does not apply
// atrest's allow-list: a header can be valid LUKS2 and still unsupported.
func parseMeta(root object, hdrSize int64) (*meta, error) {
	m := &meta{
		root:     root,
		keyslots: map[int]*Keyslot{},
		segments: map[int]*Segment{},
		digests:  map[int]*Digest{},
		tokens:   map[int]*tokenView{},
	}
	if err := m.parseConfig(hdrSize); err != nil {
		return nil, err
	}
	if err := m.parseKeyslots(hdrSize); err != nil {
		return nil, err
	}
	if err := m.parseSegments(hdrSize); err != nil {
		return nil, err
	}
	if err := m.parseDigests(); err != nil {
		return nil, err
	}
	if err := m.parseTokens(); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *meta) parseConfig(hdrSize int64) error {
	cfg, err := getObject(m.root, "config", "metadata")
	if err != nil {
		return err
	}
	if m.jsonSize, err = getOffset(cfg, "json_size", "config"); err != nil {
		return err
	}
	if m.jsonSize != hdrSize-binHeaderSize {
		return fmt.Errorf("config.json_size %d does not match the header size %d", m.jsonSize, hdrSize)
	}
	if m.keyslotsSize, err = getOffset(cfg, "keyslots_size", "config"); err != nil {
		return err
	}
	if m.keyslotsSize%4096 != 0 {
		return fmt.Errorf("config.keyslots_size %d is not a multiple of 4096", m.keyslotsSize)
	}
	if m.flags, err = getStrings(cfg, "flags", "config"); err != nil {
		return err
	}
	if v, ok := cfg["requirements"]; ok {
		req, ok := v.(object)
		if !ok {
			return errors.New("config.requirements is not an object")
		}
		if m.requirements, err = getStrings(req, "mandatory", "config.requirements"); err != nil {
			return err
		}
	}
	// The other mandatory sections must exist and be objects.
	for _, s := range []string{"keyslots", "tokens", "segments", "digests"} {
		if _, err := getObject(m.root, s, "metadata"); err != nil {
			return err
		}
	}
	return nil
}

func (m *meta) parseKeyslots(hdrSize int64) error {
	objs, err := numbered(m.root, "keyslots", maxKeyslots)
	if err != nil {
		return err
	}
	areaStart, areaEnd := 2*hdrSize, 2*hdrSize+m.keyslotsSize
	for id, o := range objs {
		p := fmt.Sprintf("keyslots.%d", id)
		ks := &Keyslot{ID: id, Priority: 1, Digest: -1}
		ks.Type, _ = getString(o, "type", p)
		if ks.KeySize, err = getInt(o, "key_size", p, 0, 1<<16); err != nil {
			return err
		}
		if _, ok := o["priority"]; ok {
			if ks.Priority, err = getInt(o, "priority", p, 0, 2); err != nil {
				return err
			}
		}
		a, err := getObject(o, "area", p)
		if err != nil {
			return err
		}
		pa := p + ".area"
		if ks.Area.Type, err = getString(a, "type", pa); err != nil {
			return err
		}
		if ks.Area.Offset, err = getOffset(a, "offset", pa); err != nil {
			return err
		}
		if ks.Area.Size, err = getOffset(a, "size", pa); err != nil {
			return err
		}
		if ks.Area.Offset < areaStart || ks.Area.Size > areaEnd-ks.Area.Offset {
			return fmt.Errorf("%s [%d, +%d) lies outside the keyslots area [%d, %d)", pa, ks.Area.Offset, ks.Area.Size, areaStart, areaEnd)
		}
		if ks.Area.Type == "raw" {
			if ks.Area.Encryption, err = getString(a, "encryption", pa); err != nil {
				return err
			}
			if ks.Area.KeySize, err = getInt(a, "key_size", pa, 0, 1<<16); err != nil {
				return err
			}
		}
		if ks.Type == "luks2" {
			if ks.Area.Type != "raw" {
				return fmt.Errorf("%s: a luks2 keyslot needs a raw area, not %q", p, ks.Area.Type)
			}
			if err := parseKDF(o, p, &ks.KDF); err != nil {
				return err
			}
			af, err := getObject(o, "af", p)
			if err != nil {
				return err
			}
			if ks.AF.Type, err = getString(af, "type", p+".af"); err != nil {
				return err
			}
			if ks.AF.Type == "luks1" {
				if ks.AF.Stripes, err = getInt(af, "stripes", p+".af", 1, 1<<31-1); err != nil {
					return err
				}
				if ks.AF.Hash, err = getString(af, "hash", p+".af"); err != nil {
					return err
				}
			}
		}
		m.keyslots[id] = ks
	}
	// Areas must not overlap.
	ids := slices.Sorted(maps.Keys(m.keyslots))
	for i, a := range ids {
		for _, b := range ids[i+1:] {
			x, y := m.keyslots[a].Area, m.keyslots[b].Area
			if x.Offset < y.Offset+y.Size && y.Offset < x.Offset+x.Size {
				return fmt.Errorf("areas of keyslots %d and %d overlap", a, b)
			}
		}
	}
	return nil
}

func parseKDF(o object, p string, k *KDF) error {
	kdf, err := getObject(o, "kdf", p)
	if err != nil {
		return err
	}
	p += ".kdf"
	if k.Type, err = getString(kdf, "type", p); err != nil {
		return err
	}
	if k.Salt, err = getBase64(kdf, "salt", p); err != nil {
		return err
	}
	const maxInt32 = 1<<31 - 1
	switch k.Type {
	case "pbkdf2":
		if k.Hash, err = getString(kdf, "hash", p); err != nil {
			return err
		}
		if k.Iterations, err = getInt(kdf, "iterations", p, 1, maxInt32); err != nil {
			return err
		}
	case "argon2i", "argon2id":
		if k.Time, err = getInt(kdf, "time", p, 1, maxInt32); err != nil {
			return err
		}
		if k.Memory, err = getInt(kdf, "memory", p, 1, maxInt32); err != nil {
			return err
		}
		if k.CPUs, err = getInt(kdf, "cpus", p, 1, maxInt32); err != nil {
			return err
		}
	}
	return nil
}

func (m *meta) parseSegments(hdrSize int64) error {
	objs, err := numbered(m.root, "segments", maxSegments)
	if err != nil {
		return err
	}
	for id, o := range objs {
		p := fmt.Sprintf("segments.%d", id)
		s := &Segment{ID: id}
		s.Type, _ = getString(o, "type", p)
		if s.Offset, err = getOffset(o, "offset", p); err != nil {
			return err
		}
		if v, _ := o["size"].(string); v == "dynamic" {
			s.Size = -1
		} else if s.Size, err = getOffset(o, "size", p); err != nil {
			return err
		}
		if s.Flags, err = getStrings(o, "flags", p); err != nil {
			return err
		}
		if s.Offset < 2*hdrSize+m.keyslotsSize {
			return fmt.Errorf("%s starts at %d, inside the header and keyslots area (ends at %d)", p, s.Offset, 2*hdrSize+m.keyslotsSize)
		}
		if s.Type == "crypt" {
			if s.IVTweak, err = getU64(o, "iv_tweak", p); err != nil {
				return err
			}
			if s.Encryption, err = getString(o, "encryption", p); err != nil {
				return err
			}
			if s.SectorSize, err = getInt(o, "sector_size", p, 512, 4096); err != nil {
				return err
			}
			switch s.SectorSize {
			case 512, 1024, 2048, 4096:
			default:
				return fmt.Errorf("%s.sector_size %d is not 512, 1024, 2048 or 4096", p, s.SectorSize)
			}
			if s.Offset%int64(s.SectorSize) != 0 {
				return fmt.Errorf("%s.offset %d is not a multiple of its sector size %d", p, s.Offset, s.SectorSize)
			}
			_, s.Integrity = o["integrity"]
		}
		m.segments[id] = s
	}
	// Segments, sorted by id, follow each other without gaps; only the last may be
	// dynamic. (Backup segments of a reencryption are not data segments; atrest
	// refuses headers that have them, see checkProfile.)
	ids := slices.Sorted(maps.Keys(m.segments))
	for i := 1; i < len(ids); i++ {
		prev, cur := m.segments[ids[i-1]], m.segments[ids[i]]
		if slices.ContainsFunc(cur.Flags, isBackupFlag) {
			continue
		}
		if prev.Size < 0 {
			return fmt.Errorf("segments.%d follows a dynamic segment", cur.ID)
		}
		if prev.Offset+prev.Size != cur.Offset {
			return fmt.Errorf("segments.%d does not start where segments.%d ends", cur.ID, prev.ID)
		}
	}
	return nil
}

func isBackupFlag(f string) bool {
	return f == "backup-final" || f == "backup-previous" || f == "backup-moved-segment"
}

func (m *meta) parseDigests() error {
	objs, err := numbered(m.root, "digests", maxDigests)
	if err != nil {
		return err
	}
	for id, o := range objs {
		p := fmt.Sprintf("digests.%d", id)
		d := &Digest{ID: id}
		d.Type, _ = getString(o, "type", p)
		if d.Keyslots, err = getRefs(o, "keyslots", p, maxKeyslots); err != nil {
			return err
		}
		if d.Segments, err = getRefs(o, "segments", p, maxSegments); err != nil {
			return err
		}
		for _, k := range d.Keyslots {
			ks, ok := m.keyslots[k]
			if !ok {
				return fmt.Errorf("%s names keyslot %d, which does not exist", p, k)
			}
			if ks.Digest >= 0 {
				return fmt.Errorf("keyslot %d is assigned to digests %d and %d", k, ks.Digest, id)
			}
			ks.Digest = id
		}
		for _, s := range d.Segments {
			if _, ok := m.segments[s]; !ok {
				return fmt.Errorf("%s names segment %d, which does not exist", p, s)
			}
		}
		if d.Type == "pbkdf2" {
			if d.Hash, err = getString(o, "hash", p); err != nil {
				return err
			}
			if d.Iterations, err = getInt(o, "iterations", p, 1, 1<<31-1); err != nil {
				return err
			}
			if d.Salt, err = getBase64(o, "salt", p); err != nil {
				return err
			}
			if d.Value, err = getBase64(o, "digest", p); err != nil {
				return err
			}
		}
		m.digests[id] = d
	}
	return nil
}

func (m *meta) parseTokens() error {
	objs, err := numbered(m.root, "tokens", maxTokens)
	if err != nil {
		return err
	}
	for id, o := range objs {
		p := fmt.Sprintf("tokens.%d", id)
		t := &tokenView{ID: id, raw: o}
		t.Type, _ = getString(o, "type", p)
		if t.Keyslots, err = getRefs(o, "keyslots", p, maxKeyslots); err != nil {
			return err
		}
		for _, k := range t.Keyslots {
			if _, ok := m.keyslots[k]; !ok {
				return fmt.Errorf("%s names keyslot %d, which does not exist", p, k)
			}
		}
		m.tokens[id] = t
	}
	return nil
}

// section returns a mandatory numbered section of the tree for editing.
func (m *meta) section(name string) object {
	s, ok := m.root[name].(object)
	if !ok {
		panic("BUG: luks2: validated metadata lacks section " + name)
	}
	return s
}

// clone deep-copies the tree so that an edit can be validated before it replaces
// the header's metadata.
func cloneTree(v any) any {
	switch x := v.(type) {
	case object:
		c := make(object, len(x))
		for k, e := range x {
			c[k] = cloneTree(e)
		}
		return c
	case []any:
		c := make([]any, len(x))
		for i, e := range x {
			c[i] = cloneTree(e)
		}
		return c
	default:
		return v
	}
}

func idString(id int) string { return strconv.Itoa(id) }

func refs(ids []int) []any {
	r := make([]any, len(ids))
	for i, id := range ids {
		r[i] = idString(id)
	}
	return r
}

type jsonNumber = json.Number
