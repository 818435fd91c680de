package luks2

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
)

// TokenType is the LUKS2 token type atrest stores its membership record in.
const TokenType = "atrest"

// tokenVersion is the version of the atrest token's fields.
const tokenVersion = 1

// AtrestToken is the atrest token: which cluster and volume a drive belongs to and
// which master key wraps the keyslots it names. It holds no secret.
type AtrestToken struct {
	// Keyslots are the keyslots the master key opens (normally one).
	Keyslots    []int  `json:"-"`
	ClusterUUID string `json:"cluster_uuid"`
	Volume      string `json:"volume"`
	VolumeUUID  string `json:"volume_uuid"`
	MemberIndex int    `json:"member_index"`
	MemberCount int    `json:"member_count"`
	MasterKeyID string `json:"master_key_id"`
}

// tokenFields is the stored form: the AtrestToken fields plus type, keyslots and
// version.
type tokenFields struct {
	Type     string   `json:"type"`
	Keyslots []string `json:"keyslots"`
	Version  int      `json:"version"`
	AtrestToken
}

// AtrestToken returns the drive's atrest token, or nil if it has none. More than one
// atrest token, or one that does not parse, is an error.
func (h *Header) AtrestToken() (*AtrestToken, error) {
	id := -1
	for _, tid := range slices.Sorted(maps.Keys(h.m.tokens)) {
		if h.m.tokens[tid].Type == TokenType {
			if id >= 0 {
				return nil, fmt.Errorf("tokens %d and %d are both atrest tokens", id, tid)
			}
			id = tid
		}
	}
	if id < 0 {
		return nil, nil
	}
	t := h.m.tokens[id]
	var f tokenFields
	if err := json.Unmarshal(encodeJSON(t.raw), &f); err != nil {
		return nil, fmt.Errorf("token %d: %w", id, err)
	}
	if f.Version != tokenVersion {
		return nil, fmt.Errorf("token %d: atrest token version %d (this atrest knows %d): %w", id, f.Version, tokenVersion, ErrUnsupported)
	}
	if f.MemberCount < 1 || f.MemberIndex < 0 || f.MemberIndex >= f.MemberCount {
		return nil, fmt.Errorf("token %d: member %d of %d", id, f.MemberIndex, f.MemberCount)
	}
	r := f.AtrestToken
	r.Keyslots = slices.Clone(t.Keyslots)
	return &r, nil
}

// SetAtrestToken stores t as the drive's atrest token (replacing the old one, or in
// the lowest free token id) and writes the header. Its keyslots must exist.
func (h *Header) SetAtrestToken(dev Device, t *AtrestToken) error {
	root := h.edit()
	if err := setToken(root, t); err != nil {
		return err
	}
	return h.commit(dev, root)
}

// setToken edits root; commit validates the keyslot references.
func setToken(root object, t *AtrestToken) error {
	tokens := root["tokens"].(object)
	id := -1
	for name, v := range tokens {
		if v.(object)["type"] == TokenType {
			id, _ = parseID(name, maxTokens)
		}
	}
	if id < 0 {
		for i := range maxTokens {
			if _, used := tokens[idString(i)]; !used {
				id = i
				break
			}
		}
		if id < 0 {
			return fmt.Errorf("all %d tokens are in use: %w", maxTokens, ErrNoSpace)
		}
	}
	f := tokenFields{Type: TokenType, Keyslots: []string{}, Version: tokenVersion, AtrestToken: *t}
	for _, k := range t.Keyslots {
		f.Keyslots = append(f.Keyslots, idString(k))
	}
	b, err := json.Marshal(f)
	if err != nil {
		panic("BUG: luks2: token does not marshal: " + err.Error())
	}
	o, err := decodeJSON(b)
	if err != nil {
		panic("BUG: luks2: token does not parse: " + err.Error())
	}
	tokens[idString(id)] = o
	return nil
}
