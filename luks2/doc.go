// Package luks2 reads, validates and writes LUKS2 headers (LUKS2 On-Disk Format
// Specification 1.1.4) in the one profile atrest uses, and opens headers that
// cryptsetup wrote as long as they stay inside an allow-list: two header copies with
// SHA-256 checksums and seqids, luks2 keyslots (PBKDF2-SHA256 or Argon2i/Argon2id,
// AF-split with 4000 SHA-256 stripes, area in aes-xts-plain64 with a 512-bit key), one
// crypt data segment in aes-xts-plain64 with a 512-bit key, a pbkdf2 digest, and the
// atrest token.
//
// Reading never writes: Load reports which copy is damaged or stale and Repair
// rewrites it. Every change (AddKeyslot, WipeKeyslot, SetAtrestToken, Repair) writes one
// header copy at a time, each with a bumped seqid and flushed, so that a crash at any
// moment leaves at least one valid copy; see docs/luks2-profile.md.
//
// The allow-list of ciphers, KDFs and costs (limits.go) is checked before any key
// derivation runs, so a crafted header cannot make a KDF run for hours.
//
// A Header is a value in memory and is not safe for concurrent use; serialising the
// writers of one drive (atrest holds the keystore lock) is the caller's job. Readers in
// other processes are safe at any moment because of the write order above.
package luks2
