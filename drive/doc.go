// Package drive is one drive's operations with a master key: open it ([Open]), read what
// its LUKS2 header says ([Inspect], [Probe]), format it with a new data key ([Format]),
// bring a LUKS2 drive formatted elsewhere into the cluster ([Adopt]), unlock it to a
// decrypting blockcrypt.Device ([Unlock]), check it for a status report with the very
// validation Unlock applies ([Check]), and move its keyslot from an old master key to a new
// one in the steps a rotation journals ([Rewrap]). The header profile and the atrest token
// are in docs/luks2-profile.md.
//
// The package takes master keys as arguments ([Key], [KeySource]) and knows nothing of
// where they are kept (package keystore) nor of the volumes a drive belongs to beyond its
// token (package registry): the caller decides which drive to open with which key.
//
// Concurrency: nothing is kept between calls, and the functions are safe for concurrent
// use. On one drive, readers (Inspect, Probe, Unlock, Check: they never write, and use a
// damaged header copy read-only) may run at any time, in any process, beside a writer:
// every header write leaves one valid copy, and Unlock and Check read the keys and the
// header again when a concurrent rotation made them miss. Writers (Format, Adopt, Rewrap;
// Adopt and Rewrap also repair a damaged header copy) must be serialised by the caller —
// the keystore's custody lock — since two writers on one header could lose a keyslot.
//
// Key bytes the package derives (data keys) are zeroed when no longer needed; the caller
// zeroes the keys it passes in (the caveats of the Go runtime are in package keystore's
// documentation).
package drive
