// Package blockcrypt encrypts a region of a blockdev.Device with XTS-AES-256 and the
// LUKS2 aes-xts-plain64 IV convention, for any offset and length (partial sectors go
// through read-modify-write under per-sector locks).
//
// Cipher is the bare sector cipher (the LUKS2 keyslot code uses it too); Device is the
// blockdev.Device layer on top of it. Both are safe for concurrent use by several
// goroutines, except Close, which must not race with other calls.
//
// # Implementations
//
// The XTS core has several implementations behind one internal table (impl.go): the
// pure-Go one (xts_generic.go) is always present; assembly ones (xts_amd64.go, built
// with `//go:build !purego`) register themselves at init when the CPU supports them.
// NewCipher picks the first available one; the tests run every known-answer and
// differential test under each available implementation, and `-tags purego` builds
// only the pure-Go path.
package blockcrypt
