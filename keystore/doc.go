// Package keystore is atrest's key custody on the boot drive: the directory that holds
// the master key (master.key, and master.key.next during a rotation), keystore.json (the
// cluster's identity, the master key's id, the last rotation and the rotation journal)
// and the custody lock; and the online, crash-safe master key rotation, which rewraps
// each drive's data key through package drive. The inventory of volumes and drives is
// package registry's (registry.json, in the same directory); keystore.json version 1,
// which held the drives too, is read and migrated (MigrateV1). The on-disk formats are in
// docs/luks2-profile.md and docs/registry.md.
//
// A Keystore opened with Open is a read-only snapshot, safe for concurrent use by
// several goroutines; its Keys reads the key files afresh at each call, so that a
// drive.KeySource built on it follows a rotation in another process. A Locked (Lock,
// Init) holds the custody lock (flock on dir/lock) and only it has the changing methods
// (MasterKey, MigrateV1, Rotate): the type proves the lock is held. It is used by one
// goroutine. Readers in other processes never need the lock: every file is replaced
// atomically (internal/securefile), and Open copes with a rotation finishing between its
// reads. Locks are taken in the order custody, then registry.
//
// The custody lock serialises the changes of one keystore; drives are held across
// keystores by their exclusive open (package drive): format and adopt hold the drive, as
// the daemon holds the drives it serves. Rotate opens drives without the hold, so that it
// rewraps them beside the daemon.
//
// Key bytes are zeroed (clear) as soon as they are not needed. The Go caveat: that
// covers only the buffers this package and package drive own. Copies made by the
// runtime (stack growth, the garbage collector freeing without zeroing, the string
// conversion crypto/pbkdf2 requires, AES key schedules inside crypto/aes) are beyond
// reach, and so are copies the kernel keeps (page cache, swap). The keys live on the
// boot drive unencrypted anyway (docs/design.md, what atrest protects).
package keystore
