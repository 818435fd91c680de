package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/atrest/atrest/mountstack"
	"github.com/atrest/atrest/volmount"
)

// luksHeader is what `atrest drive format` puts before the data: an atrest drive of
// the volume size plus this holds a volume of the volume size.
const luksHeader = 16 << 20

// target is where fio runs for one peer: an NBD URI or a file, and the processes
// whose CPU time the run counts.
type target struct {
	uri  string // NBD URI (the nbd level)
	file string // file (the other levels)
	size int64  // bytes of it fio uses
	pids []int
}

// setup builds the binaries and sets up every stack the plan uses, each with its
// cleanup registered before the next starts.
func (b *bench) setup(ctx context.Context) error {
	m := b.mode
	uses := func(level string, peers ...string) bool {
		for _, p := range peers {
			if m.uses(level, p) {
				return true
			}
		}
		return false
	}
	needEnc := uses("nbd", "atrest", "atrest-2j") || uses("fuse", "atrest", "nbdfuse", "atrest-nolog")
	needEnc1 := uses("nbd", "atrest-gmp1", "atrest-gmp1-2j")
	needEncFS := uses("ext4", "atrest")
	needPlain := uses("nbd", "plain", "plain-2j", "nbdkit", "nbdkit-2j") || uses("fuse", "plain", "fusefs-file") || uses("drive", "file")
	needPlainServe := uses("nbd", "plain", "plain-2j") || uses("fuse", "plain") || uses("ext4", "plain")
	needNbdkit := uses("nbd", "nbdkit", "nbdkit-2j")
	V := m.driveBytes

	b.progressf("building atrest, plainserve and fuseserve")
	if _, err := b.run(ctx, nil, "go", "build", "-o", b.bin+"/", "./cmd/atrest", "./bench/cmd/plainserve", "./bench/fuse/fuseserve"); err != nil {
		return err
	}
	atrest := filepath.Join(b.bin, "atrest")
	ks := "ATREST_KEYSTORE=" + filepath.Join(b.work, "keystore")

	b.progressf("XTS throughput: atrest speed --json")
	if err := b.speed(ctx, atrest); err != nil {
		return err
	}

	b.progressf("drives in %s: %s each", b.images, bytesText(V))
	if _, err := b.run(ctx, []string{ks}, atrest, "init"); err != nil {
		return err
	}
	img := func(name string) string { return filepath.Join(b.images, name) }
	var encDrives []string
	for _, v := range []struct {
		name string
		need bool
	}{{"enc", needEnc}, {"encfs", needEncFS}, {"enc1", needEnc1}} {
		if !v.need {
			continue
		}
		if _, err := b.run(ctx, []string{ks}, atrest, "drive", "format", "--create", strconv.FormatInt(V+luksHeader, 10),
			"--volume", v.name, img(v.name)); err != nil {
			return err
		}
		if v.name != "enc1" {
			encDrives = append(encDrives, img(v.name))
		}
	}
	if needPlain || needPlainServe {
		if err := os.Truncate(createFile(img("plain")), V); err != nil {
			return err
		}
		// Real data everywhere, so that reads copy bytes rather than the zero pages of holes.
		if _, err := b.run(ctx, nil, "fio", "--name=fill", "--filename="+img("plain"), "--rw=write", "--bs=1M",
			"--size="+strconv.FormatInt(V, 10), "--ioengine=psync", "--output=/dev/null"); err != nil {
			return err
		}
	}
	if needPlainServe {
		// plainserve's second export, for the unencrypted atrest mount (sparse: ext4
		// goes there).
		if err := os.Truncate(createFile(img("plainfs")), V); err != nil {
			return err
		}
	}

	// The servers.
	var serve, serve1, plain *daemon
	var err error
	if len(encDrives) > 0 {
		sock := filepath.Join(b.work, "enc.sock")
		if serve, err = b.daemon(ctx, "atrest-serve", []string{ks}, "atrest serve: serving",
			append([]string{atrest, "serve", "--shared-writers", "--listen", "unix:" + sock, "--control", sock + ".ctl"}, encDrives...)...); err != nil {
			return err
		}
		if needEnc {
			uri := "nbd+unix:///enc?socket=" + sock
			if err := b.fillExport(ctx, uri, V); err != nil {
				return err
			}
			b.addTarget("nbd", "atrest", target{uri: uri, size: V, pids: []int{serve.pid()}})
			b.addTarget("nbd", "atrest-2j", target{uri: uri, size: V, pids: []int{serve.pid()}})
		}
	}
	if needEnc1 {
		// A drive of its own: atrest serve holds its drives exclusively.
		sock := filepath.Join(b.work, "enc1.sock")
		if serve1, err = b.daemon(ctx, "atrest-serve-gomaxprocs1", []string{ks, "GOMAXPROCS=1"}, "atrest serve: serving",
			atrest, "serve", "--shared-writers", "--listen", "unix:"+sock, "--control", sock+".ctl", img("enc1")); err != nil {
			return err
		}
		uri := "nbd+unix:///enc1?socket=" + sock
		if err := b.fillExport(ctx, uri, V); err != nil {
			return err
		}
		b.addTarget("nbd", "atrest-gmp1", target{uri: uri, size: V, pids: []int{serve1.pid()}})
		b.addTarget("nbd", "atrest-gmp1-2j", target{uri: uri, size: V, pids: []int{serve1.pid()}})
	}
	// plainserve serves two files, so its exports are named after them.
	plainURI := func(name string) string {
		return "nbd+unix:///" + name + "?socket=" + filepath.Join(b.work, "plain.sock")
	}
	if needPlainServe {
		if plain, err = b.daemon(ctx, "plainserve", nil, "ready", filepath.Join(b.bin, "plainserve"),
			"-listen", "unix:"+filepath.Join(b.work, "plain.sock"), img("plain"), img("plainfs")); err != nil {
			return err
		}
		if err := b.checkSize(ctx, plainURI("plain"), V); err != nil {
			return err
		}
		b.addTarget("nbd", "plain", target{uri: plainURI("plain"), size: V, pids: []int{plain.pid()}})
		b.addTarget("nbd", "plain-2j", target{uri: plainURI("plain"), size: V, pids: []int{plain.pid()}})
	}
	if needNbdkit {
		d, uri, err := b.nbdkit(ctx, "nbdkit", "file", "file="+img("plain"))
		if err != nil {
			return err
		}
		b.addTarget("nbd", "nbdkit", target{uri: uri, size: V, pids: []int{d.pid()}})
		b.addTarget("nbd", "nbdkit-2j", target{uri: uri, size: V, pids: []int{d.pid()}})
	}
	if uses("nbd", "nbdkit-luks") {
		if err := b.luks(ctx, img("luks"), V); err != nil {
			return err
		}
	}
	b.addTarget("drive", "file", target{file: img("plain"), size: V})

	// The FUSE files.
	encURI := "nbd+unix:///enc?socket=" + filepath.Join(b.work, "enc.sock")
	fuse := func(peer string, server *daemon, args ...string) error {
		dir := filepath.Join(b.work, "fuse", peer)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		// After the daemon's stop (its SIGTERM unmounts, unless the connection was
		// aborted).
		b.clean.add("unmount "+dir, func() error {
			if isMounted(dir) {
				return runQuiet(10*time.Second, nil, "fusermount3", "-u", dir)
			}
			return nil
		})
		d, err := b.daemon(ctx, "fuseserve-"+peer, nil, "ready ",
			append([]string{filepath.Join(b.bin, "fuseserve"), "-dir", dir}, args...)...)
		if err != nil {
			return err
		}
		pids := []int{d.pid()}
		if server != nil {
			pids = append(pids, server.pid())
		}
		b.addTarget("fuse", peer, target{file: filepath.Join(dir, "volume"), size: V, pids: pids})
		return nil
	}
	if uses("fuse", "atrest") {
		if err := fuse("atrest", serve, "-nbd", encURI); err != nil {
			return err
		}
	}
	if uses("fuse", "plain") {
		if err := fuse("plain", plain, "-nbd", plainURI("plain")); err != nil {
			return err
		}
	}
	if uses("fuse", "atrest-nolog") {
		if err := fuse("atrest-nolog", serve, "-nbd", encURI, "-replay-bytes", "-1"); err != nil {
			return err
		}
	}
	if uses("fuse", "fusefs-file") {
		if err := fuse("fusefs-file", nil, "-image", img("plain")); err != nil {
			return err
		}
	}
	if uses("fuse", "nbdfuse") {
		if err := b.nbdfuse(ctx, encURI, serve, V); err != nil {
			return err
		}
	}

	// The ext4 mounts, then the fio file in each, laid out before the runs.
	F := m.fileBytes
	if uses("ext4", "atrest") {
		if err := b.atrestMount(ctx, atrest, "atrest", "nbd+unix:///encfs?socket="+filepath.Join(b.work, "enc.sock"), serve, F); err != nil {
			return err
		}
	}
	if uses("ext4", "plain") {
		if err := b.atrestMount(ctx, atrest, "plain", plainURI("plainfs"), plain, F); err != nil {
			return err
		}
	}
	if uses("ext4", "kernel") {
		if err := b.kernelExt4(ctx, img("kern"), V, F); err != nil {
			return err
		}
	}
	for _, peer := range []string{"atrest", "plain", "kernel"} {
		t, ok := b.targets["ext4/"+peer]
		if !ok {
			continue
		}
		b.progressf("laying out the fio file in ext4 (%s)", peer)
		if _, err := b.run(ctx, nil, "fio", "--name=layout", "--filename="+t.file, "--size="+strconv.FormatInt(F, 10),
			"--rw=write", "--bs=1M", "--direct=1", "--ioengine=libaio", "--iodepth=8", "--end_fsync=1", "--output=/dev/null"); err != nil {
			return err
		}
	}
	return nil
}

func (b *bench) addTarget(level, peer string, t target) {
	if b.mode.uses(level, peer) {
		b.targets[level+"/"+peer] = t
	}
}

// daemon starts a daemon, registers its stop (SIGTERM, then SIGKILL after 30 s) and
// waits until its log shows ready.
func (b *bench) daemon(ctx context.Context, name string, env []string, ready string, argv ...string) (*daemon, error) {
	b.progressf("starting %s", name)
	d, err := b.start(name, env, argv...)
	if err != nil {
		return nil, err
	}
	b.clean.add("stop "+name, func() error { return d.stop(syscall.SIGTERM, 30*time.Second) })
	return d, b.waitReady(ctx, d, logHas(d, ready))
}

// nbdkit serves ARGS (a plugin and its parameters, filters first) on a unix socket in
// the foreground.
func (b *bench) nbdkit(ctx context.Context, name string, args ...string) (*daemon, string, error) {
	sock := filepath.Join(b.work, name+".sock")
	pidfile := filepath.Join(b.work, name+".pid")
	b.progressf("starting %s", name)
	d, err := b.start(name, nil, append([]string{"nbdkit", "-f", "--unix", sock, "--pidfile", pidfile}, args...)...)
	if err != nil {
		return nil, "", err
	}
	b.clean.add("stop "+name, func() error { return d.stop(syscall.SIGTERM, 30*time.Second) })
	if err := b.waitReady(ctx, d, func() bool { st, err := os.Stat(pidfile); return err == nil && st.Size() > 0 }); err != nil {
		return nil, "", err
	}
	return d, "nbd+unix:///?socket=" + sock, nil
}

// luks makes a LUKS1 image (cryptsetup; nbdkit 1.32's luks filter reads no LUKS2)
// with real data in its payload, and serves it with nbdkit's luks filter.
func (b *bench) luks(ctx context.Context, path string, size int64) error {
	b.progressf("LUKS1 image for nbdkit's luks filter")
	key := filepath.Join(b.work, "luks-passphrase")
	if err := os.WriteFile(key, []byte("atrest-benchmark-passphrase"), 0o600); err != nil {
		return err
	}
	if err := os.Truncate(createFile(path), size+luksHeader); err != nil {
		return err
	}
	if _, err := b.run(ctx, nil, "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1", "--cipher", "aes-xts-plain64",
		"--key-size", "512", "--pbkdf-force-iterations", "1000", "--key-file", key, path); err != nil {
		return err
	}
	dump, err := b.run(ctx, nil, "cryptsetup", "luksDump", path)
	if err != nil {
		return err
	}
	var offset int64 = -1
	for _, line := range strings.Split(string(dump), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "Payload" && f[1] == "offset:" {
			if n, err := strconv.ParseInt(f[2], 10, 64); err == nil {
				offset = n * 512
			}
		}
	}
	if offset < 0 {
		return fmt.Errorf("no payload offset in the LUKS header of %s", path)
	}
	if _, err := b.run(ctx, nil, "fio", "--name=fill", "--filename="+path, "--offset="+strconv.FormatInt(offset, 10),
		"--rw=write", "--bs=1M", "--size="+strconv.FormatInt(size, 10), "--ioengine=psync", "--output=/dev/null"); err != nil {
		return err
	}
	d, uri, err := b.nbdkit(ctx, "nbdkit-luks", "--filter=luks", "file", "file="+path, "passphrase=+"+key)
	if err != nil {
		return err
	}
	b.addTarget("nbd", "nbdkit-luks", target{uri: uri, size: size, pids: []int{d.pid()}})
	return nil
}

// nbdfuse mounts the export with nbdfuse as WORK/fuse/nbdfuse/volume.
func (b *bench) nbdfuse(ctx context.Context, uri string, server *daemon, size int64) error {
	dir := filepath.Join(b.work, "fuse", "nbdfuse")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	pidfile := filepath.Join(b.work, "nbdfuse.pid")
	b.progressf("starting nbdfuse")
	d, err := b.start("nbdfuse", nil, "nbdfuse", "-P", pidfile, filepath.Join(dir, "volume"), uri)
	if err != nil {
		return err
	}
	b.clean.add("unmount nbdfuse", func() error {
		if isMounted(dir) {
			if err := runQuiet(10*time.Second, nil, "fusermount3", "-u", dir); err != nil {
				return err
			}
		}
		return d.stop(syscall.SIGTERM, 10*time.Second)
	})
	if err := b.waitReady(ctx, d, func() bool { st, err := os.Stat(pidfile); return err == nil && st.Size() > 0 }); err != nil {
		return err
	}
	pids := []int{d.pid()}
	if server != nil {
		pids = append(pids, server.pid())
	}
	b.addTarget("fuse", "nbdfuse", target{file: filepath.Join(dir, "volume"), size: size, pids: pids})
	return nil
}

// atrestMount mounts the export with `atrest mount --background` on WORK/mnt/PEER and
// waits until ext4's lazy inode table initialisation is over (it would compete with
// fio): init_itable=0 starts it at once.
func (b *bench) atrestMount(ctx context.Context, atrest, peer, uri string, server *daemon, fileSize int64) error {
	mp := filepath.Join(b.work, "mnt", peer)
	fuseDir := filepath.Join(b.work, "mnt-fuse", peer)
	if err := os.MkdirAll(mp, 0o755); err != nil {
		return err
	}
	b.progressf("atrest mount (%s)", peer)
	b.clean.add("atrest umount "+mp, func() error {
		if _, err := os.Stat(mountstack.StatePath(mp)); err != nil && !isMounted(mp) {
			return nil
		}
		err := runQuiet(20*time.Second, nil, atrest, "umount", mp)
		if err != nil {
			// Its server is gone (the run failed because it crashed?): the unmount
			// waits for a flush that cannot come. Abort the FUSE connections and try
			// again.
			abortFUSE(b.work, b.progressf)
			if err2 := runQuiet(60*time.Second, nil, atrest, "umount", mp); err2 == nil || !isMounted(mp) {
				return fmt.Errorf("%w; unmounted after aborting the FUSE connections", err)
			}
		}
		return err
	})
	if _, err := b.run(ctx, nil, atrest, "mount", "--background", "-o", "noatime,init_itable=0", "--nbd", uri, "--fuse-dir", fuseDir, mp); err != nil {
		return err
	}
	raw, err := os.ReadFile(mountstack.StatePath(mp))
	if err != nil {
		return fmt.Errorf("the state of atrest mount %s: %w", mp, err)
	}
	var st mountstack.State
	if err := json.Unmarshal(raw, &st); err != nil || st.PID == 0 || st.Loop == "" {
		return fmt.Errorf("the state of atrest mount %s has no process or loop device: %s", mp, raw)
	}
	if err := b.waitItable(ctx, st.Loop); err != nil {
		return err
	}
	pids := []int{st.PID}
	if server != nil {
		pids = append(pids, server.pid())
	}
	b.addTarget("ext4", peer, target{file: filepath.Join(mp, "fio.dat"), size: fileSize, pids: pids})
	return nil
}

// kernelExt4 is the ceiling: ext4 on a loop device (direct I/O, as atrest mount
// attaches its own) over a plain image.
func (b *bench) kernelExt4(ctx context.Context, path string, size, fileSize int64) error {
	b.progressf("ext4 on a loop device (kernel only)")
	if err := os.Truncate(createFile(path), size); err != nil {
		return err
	}
	out, err := b.run(ctx, nil, "losetup", "--direct-io=on", "--find", "--show", path)
	if err != nil {
		return err
	}
	loop := strings.TrimSpace(string(out))
	b.clean.add("losetup -d "+loop, func() error { return runQuiet(10*time.Second, nil, "losetup", "-d", loop) })
	if _, err := b.run(ctx, nil, "mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", loop); err != nil {
		return err
	}
	mp := filepath.Join(b.work, "mnt", "kernel")
	if err := os.MkdirAll(mp, 0o755); err != nil {
		return err
	}
	if _, err := b.run(ctx, nil, "mount", "-o", "noatime", loop, mp); err != nil {
		return err
	}
	b.clean.add("umount "+mp, func() error { return runQuiet(60*time.Second, nil, "umount", mp) })
	b.addTarget("ext4", "kernel", target{file: filepath.Join(mp, "fio.dat"), size: fileSize})
	return nil
}

// waitItable waits until every block group of the ext4 on dev has its inode table
// zeroed.
func (b *bench) waitItable(ctx context.Context, dev string) error {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		out, err := b.run(ctx, nil, "dumpe2fs", dev)
		if err != nil {
			return err
		}
		groups, zeroed := 0, 0
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "Group ") && strings.Contains(line, ": (Blocks ") {
				groups++
				if strings.Contains(line, "ITABLE_ZEROED") {
					zeroed++
				}
			}
		}
		if groups > 0 && groups == zeroed {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("ext4 on %s: %d of %d inode tables zeroed after 5 minutes", dev, zeroed, groups)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// fillExport checks the export's size and writes all of it, so that reads decrypt
// real ciphertext rather than the zero pages of holes.
func (b *bench) fillExport(ctx context.Context, uri string, size int64) error {
	if err := b.checkSize(ctx, uri, size); err != nil {
		return err
	}
	b.progressf("writing %s through its server", uri)
	_, err := b.run(ctx, nil, "fio", "--name=fill", "--ioengine=nbd", "--uri="+uri, "--rw=write", "--bs=1M",
		"--iodepth=8", "--size="+strconv.FormatInt(size, 10), "--output=/dev/null")
	return err
}

// checkSize fails unless the export has exactly size bytes (the peers must use as
// much of their drives as each other).
func (b *bench) checkSize(ctx context.Context, uri string, size int64) error {
	out, err := b.run(ctx, nil, "nbdinfo", "--size", uri)
	if err != nil {
		return err
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	if err != nil || n != size {
		return fmt.Errorf("export %s has %s bytes, want %d", uri, strings.TrimSpace(string(out)), size)
	}
	return nil
}

// speed runs `atrest speed --json`.
func (b *bench) speed(ctx context.Context, atrest string) error {
	out, err := b.run(ctx, nil, append([]string{atrest, "speed", "--json"}, b.mode.speedArgs...)...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(out, &b.rep.Speed); err != nil {
		return fmt.Errorf("atrest speed --json: %w", err)
	}
	// The first implementation measured is the one atrest uses: xtsspeed.Measure goes
	// through them in order of preference, the chosen one first.
	if len(b.rep.Speed) > 0 {
		b.rep.SpeedImpl = b.rep.Speed[0].Impl
	}
	return nil
}

// createFile creates an empty file (its errors surface in the Truncate that follows)
// and returns its path.
func createFile(path string) string {
	if f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600); err == nil {
		f.Close()
	}
	return path
}

func isMounted(dir string) bool {
	s, err := volmount.Inspect(dir)
	return err == nil && s.FSType != ""
}

func bytesText(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d bytes", n)
}
