// Package keystore is atrest's boot-drive keystore: the directory that holds the
// master key (master.key), the cluster's state and drive registry (keystore.json) and
// the lock that serialises every change; and the operations on drives that need the
// master key: format, adopt, unlock, status and the online, crash-safe master key
// rotation of DESIGN §4. The on-disk formats are in docs/luks2-profile.md.
//
// A Keystore opened with Open is a read-only snapshot, safe for concurrent use by
// several goroutines (Unlock, Status); OpenLocked holds the keystore lock (flock) and
// its changing methods must be called from one goroutine. Readers in other processes
// never need the lock: every file is replaced atomically, and Unlock copes with a
// rotation running beside it.
//
// The keystore lock serialises the commands of one keystore; drives are held across
// keystores: FormatDrive and AdoptDrive open the drive exclusively and fail with
// blockdev.ErrInUse while another process holds it, as the daemon does with Unlock and
// UnlockOptions.Exclusive (see blockdev.FileOptions.Exclusive). Rotation and Status
// open drives without the hold, so they work beside the daemon.
//
// Key bytes are zeroed (clear) as soon as they are not needed. The Go caveat: that
// covers only the buffers this package owns. Copies made by the runtime (stack
// growth, the garbage collector moving nothing but freeing without zeroing, the
// string conversion crypto/pbkdf2 requires, AES key schedules inside crypto/aes) are
// beyond reach, and so are copies the kernel keeps (page cache, swap). The keys live
// on the boot drive unencrypted anyway (DESIGN §1).
package keystore
