package slot_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/atrest/atrest/blockdev"
	"github.com/atrest/atrest/luks2"
	"github.com/atrest/atrest/slot"
)

// TestPullDuringWrites: a drive pulled under a stream of writes and flushes, losing
// its volatile cache, and put back 300 ms later: every write is answered without an
// error, and afterwards the drive holds exactly what was written, the writes answered
// but not flushed before the pull included.
func TestPullDuringWrites(t *testing.T) {
	mem := newDrive(t, testSize, sharedHeader())
	first := insert(mem)
	second := insert(mem)
	path := absentPath(t)
	s := newSlot(t, unplugged{first}, slot.Config{
		Path: path, Open: opener(map[string]blockdev.Device{path + "-back": second}), MissingTimeout: time.Minute,
	})

	const writers = 4
	const region = (testSize - dataOff) / writers
	model := make([]byte, testSize-dataOff)
	var answered atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, writers+1)
	for w := range writers {
		wg.Go(func() {
			base := int64(w * region)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				n := int64(512 * (1 + i%64))
				off := base + int64(i*4096)%(region-n)
				p := random(int(n))
				if _, err := s.WriteAt(p, dataOff+off); err != nil {
					errs <- fmt.Errorf("write at %d: %w", off, err)
					return
				}
				copy(model[off:], p) // each writer owns its region
				answered.Add(1)
			}
		})
	}
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if err := s.Flush(); err != nil {
				errs <- fmt.Errorf("flush: %w", err)
				return
			}
		}
	})

	for answered.Load() < 500 {
		time.Sleep(time.Millisecond)
	}
	first.Vanish()
	first.PowerCut()
	st := waitFor(t, s, "missing", isMissing)
	if st.Generation != 2 || !strings.Contains(st.Reason, "probe failed") {
		t.Errorf("state after the pull: %+v", st)
	}
	time.Sleep(300 * time.Millisecond)
	before := answered.Load()
	// The writers wait: what they were answered is the model, and the drive lost
	// some of it with its cache.
	if st := s.State(); st.Unflushed == 0 {
		t.Error("nothing unflushed in the replay log at the pull")
	}
	lost := !bytes.Equal(readAll(t, mem, dataOff, testSize-dataOff), model)
	if err := s.Reinsert(path + "-back"); err != nil {
		t.Fatal(err)
	}
	for answered.Load() < before+500 {
		time.Sleep(time.Millisecond)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if !lost {
		t.Error("the pulled drive lost nothing: the test did not test the replay")
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "the slot after the reinsertion", readAll(t, s, dataOff, testSize-dataOff), model)
	mustEqual(t, "the drive after a flush", readAll(t, mem, dataOff, testSize-dataOff), model)
	if st := s.State(); st.Presence != slot.Present || st.Generation != 3 || st.Unflushed != 0 || st.ReturnedPath != path+"-back" {
		t.Errorf("state at the end: %+v", st)
	}
}

// TestPullBetweenWriteAndFlush: a write answered, then the drive pulled and its cache
// lost before a flush: the write is on the drive once it is back, and the read that
// found the drive gone waited for it and reads what was written.
func TestPullBetweenWriteAndFlush(t *testing.T) {
	mem := newDrive(t, testSize, sharedHeader())
	first := insert(mem)
	path := absentPath(t)
	s := newSlot(t, first, slot.Config{
		Path: path, Open: opener(map[string]blockdev.Device{path: insert(mem)}), MissingTimeout: time.Minute,
	})
	flushed, unflushed, zeroed := random(8192), random(5000), random(4096)
	if _, err := s.WriteAt(flushed, dataOff); err != nil {
		t.Fatal(err)
	}
	if _, err := s.WriteAt(zeroed, dataOff+65536); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if st := s.State(); st.Unflushed != 0 {
		t.Fatalf("%d bytes in the replay log after a flush", st.Unflushed)
	}
	if _, err := s.WriteAt(unflushed, dataOff+6000); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteZeroes(dataOff+65536, 4096, 0); err != nil {
		t.Fatal(err)
	}
	if st := s.State(); st.Unflushed != int64(len(unflushed)) {
		t.Fatalf("%d bytes in the replay log, want %d", st.Unflushed, len(unflushed))
	}
	first.Vanish()
	first.PowerCut()
	if got := readAll(t, mem, dataOff+6000, 5000); bytes.Equal(got, unflushed) {
		t.Fatal("the power cut kept the unflushed write")
	}
	read := make([]byte, 16384)
	done := returned(func() error { _, err := s.ReadAt(read, dataOff); return err })
	waitFor(t, s, "missing", isMissing)
	time.Sleep(300 * time.Millisecond)
	pending(t, "a read of the missing drive", done)
	if err := s.Reinsert(path); err != nil {
		t.Fatal(err)
	}
	if err := result(t, "the waiting read", done); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 16384)
	copy(want, flushed)
	copy(want[6000:], unflushed)
	mustEqual(t, "the waiting read", read, want)
	// Reinsert flushed the replay: it is durable on the drive.
	mustEqual(t, "the drive after the reinsertion", readAll(t, mem, dataOff, 16384), want)
	mustEqual(t, "the unflushed zeroing on the drive", readAll(t, mem, dataOff+65536, 4096), make([]byte, 4096))
	if st := s.State(); st.Unflushed != 0 {
		t.Errorf("%d bytes in the replay log after the reinsertion", st.Unflushed)
	}
}

// TestFUAWriteOverLoggedWrite: a FUA write over an unflushed write is what the drive
// holds after a pull and a replay, not the older write.
func TestFUAWriteOverLoggedWrite(t *testing.T) {
	mem := newDrive(t, testSize, sharedHeader())
	first := insert(mem)
	path := absentPath(t)
	s := newSlot(t, first, slot.Config{Path: path, Open: opener(map[string]blockdev.Device{path: insert(mem)})})
	if _, err := s.WriteAtFUA(random(4096), dataOff+1<<20); err != nil {
		t.Fatal(err)
	}
	if st := s.State(); st.Unflushed != 0 {
		t.Fatalf("a FUA write with nothing else unflushed took %d bytes of log", st.Unflushed)
	}
	if _, err := s.WriteAt(random(8192), dataOff); err != nil {
		t.Fatal(err)
	}
	fua := random(4096)
	if _, err := s.WriteAtFUA(fua, dataOff+2048); err != nil {
		t.Fatal(err)
	}
	pull(t, s, first)
	if err := s.Reinsert(path); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "the FUA write after the replay", readAll(t, mem, dataOff+2048, 4096), fua)
}

// TestTrimReplay: a trim in the replay log is skipped when the returned drive cannot
// trim; the reinsertion succeeds.
func TestTrimReplay(t *testing.T) {
	mem := newDrive(t, testSize, sharedHeader())
	first := insert(mem)
	path := absentPath(t)
	cannotTrim := blockdev.NewFaulty(struct{ blockdev.Device }{kept{mem}})
	s := newSlot(t, first, slot.Config{Path: path, Open: opener(map[string]blockdev.Device{path: cannotTrim})})
	if err := s.Trim(dataOff, 65536); err != nil {
		t.Fatal(err)
	}
	p := random(4096)
	if _, err := s.WriteAt(p, dataOff+4096); err != nil {
		t.Fatal(err)
	}
	pull(t, s, first)
	if err := s.Reinsert(path); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "the write after the trim", readAll(t, mem, dataOff+4096, 4096), p)
	if err := s.Trim(dataOff, 4096); !errors.Is(err, blockdev.ErrNotSupported) {
		t.Errorf("Trim on a drive that cannot: %v, want ErrNotSupported", err)
	}
	if st := s.State(); st.Presence != slot.Present {
		t.Errorf("ErrNotSupported made the drive %s", st.Presence)
	}
}

// imageSlot makes a slot over a Faulty device over an image file at a path, so that a
// probe finds the drive there.
func imageSlot(t *testing.T, cfg slot.Config) (s *slot.Slot, f *blockdev.Faulty, path string) {
	t.Helper()
	path = imageFile(t, testSize, sharedHeader())
	file, err := blockdev.OpenFile(path, blockdev.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	f = blockdev.NewFaulty(file)
	cfg.Path = path
	s = newSlot(t, f, cfg)
	return s, f, path
}

// TestMediumError: an I/O error on a drive that answers the probe is returned with its
// class, and the drive stays in the slot; errors that say nothing about the drive are
// returned without a probe.
func TestMediumError(t *testing.T) {
	s, f, _ := imageSlot(t, slot.Config{})
	remove := f.InjectError(dataOff, 4096, blockdev.FaultReadWrite, nil)
	if _, err := s.ReadAt(make([]byte, 8192), dataOff); !errors.Is(err, blockdev.ErrMedium) || !errors.Is(err, syscall.EIO) {
		t.Errorf("read over a bad range: %v, want a medium error", err)
	}
	if _, err := s.WriteAt(make([]byte, 4096), dataOff); !errors.Is(err, blockdev.ErrMedium) {
		t.Errorf("write over a bad range: %v, want a medium error", err)
	}
	remove()
	// A device that says it is gone but answers the probe: the request failed on it.
	remove = f.InjectError(dataOff, 4096, blockdev.FaultRead, syscall.ENODEV)
	if _, err := s.ReadAt(make([]byte, 4096), dataOff); !errors.Is(err, blockdev.ErrMedium) || errors.Is(err, blockdev.ErrGone) {
		t.Errorf("read failing with ENODEV on a drive that answers the probe: %v, want a medium error only", err)
	}
	remove()
	if _, err := s.WriteAt(make([]byte, 4096), dataOff); err != nil {
		t.Fatal(err)
	}
	remove = f.FailFlush(nil)
	if err := s.Flush(); !errors.Is(err, blockdev.ErrMedium) {
		t.Errorf("failing flush: %v, want a medium error", err)
	}
	if st := s.State(); st.Unflushed != 4096 {
		t.Errorf("a failed flush left %d bytes in the replay log, want 4096", st.Unflushed)
	}
	remove()
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}

	if _, err := s.WriteAt(make([]byte, 4096), testSize-100); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Errorf("write past the end: %v, want ErrOutOfRange", err)
	}
	if err := s.WriteZeroes(dataOff, 4096, blockdev.ZeroFast); err != nil {
		t.Errorf("fast zeroing on a drive that zeroes in its cache: %v", err)
	}
	if st := s.State(); st.Presence != slot.Present || st.Generation != 1 {
		t.Errorf("state after medium errors: %+v, want present in generation 1", st)
	}
}

// TestProbeFindsAnotherDrive: the probe fails, and the drive goes missing, when the
// drive's path holds another file, or when the file there names another UUID in its
// binary header.
func TestProbeFindsAnotherDrive(t *testing.T) {
	t.Run("Replaced", func(t *testing.T) {
		s, f, path := imageSlot(t, slot.Config{MissingTimeout: -1})
		other := imageFile(t, testSize, sharedHeader())
		if err := os.Rename(other, path); err != nil {
			t.Fatal(err)
		}
		f.InjectError(dataOff, 4096, blockdev.FaultRead, nil)
		if _, err := s.ReadAt(make([]byte, 4096), dataOff); !errors.Is(err, blockdev.ErrGone) {
			t.Errorf("read after the path was replaced: %v, want ErrGone", err)
		}
		if st := s.State(); st.Presence != slot.Missing || !strings.Contains(st.Reason, "no longer the file") {
			t.Errorf("state: %+v", st)
		}
	})
	t.Run("OtherUUID", func(t *testing.T) {
		s, f, path := imageSlot(t, slot.Config{MissingTimeout: -1})
		if st := s.Check(); st.Presence != slot.Present {
			t.Fatalf("Check of a present drive: %+v", st)
		}
		file, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		other := formatHeader(t, "")
		if _, err := file.WriteAt(other[:4096], 0); err != nil {
			t.Fatal(err)
		}
		file.Close()
		f.InjectError(dataOff, 4096, blockdev.FaultWrite, nil)
		if _, err := s.WriteAt(make([]byte, 4096), dataOff); !errors.Is(err, blockdev.ErrGone) {
			t.Errorf("write after the header changed: %v, want ErrGone", err)
		}
		if st := s.State(); st.Presence != slot.Missing || !strings.Contains(st.Reason, "holds drive") {
			t.Errorf("state: %+v", st)
		}
	})
}

// TestMissingTimeout: requests wait for a missing drive until MissingTimeout after it
// went, then fail with ErrMissing of the class ErrTimeout (EIO, not a gone device: the
// NBD server must not make its client reconnect) saying since when; later ones fail at
// once, until the drive is back. With a negative timeout they fail at once, as gone.
func TestMissingTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	mem := newDrive(t, testSize, sharedHeader())
	first := insert(mem)
	path := absentPath(t)
	s := newSlot(t, first, slot.Config{
		Path: path, Open: opener(map[string]blockdev.Device{path: insert(mem)}), MissingTimeout: timeout,
	})
	first.Vanish()
	start := time.Now()
	err := result(t, "a read of a drive missing too long", returned(func() error {
		_, err := s.ReadAt(make([]byte, 4096), dataOff)
		return err
	}))
	waited := time.Since(start)
	if !errors.Is(err, slot.ErrMissing) || !errors.Is(err, blockdev.ErrTimeout) || errors.Is(err, blockdev.ErrGone) ||
		!strings.Contains(err.Error(), "missing since") {
		t.Fatalf("read of a drive missing too long: %v, want ErrMissing and ErrTimeout saying since when", err)
	}
	st := s.State()
	if !st.TimedOut || waited < timeout-10*time.Millisecond {
		t.Fatalf("the read waited %v (timeout %v), state %+v", waited, timeout, st)
	}
	start = time.Now()
	for _, call := range []func() error{
		func() error { _, err := s.ReadAt(make([]byte, 4096), dataOff); return err },
		func() error { _, err := s.WriteAt(make([]byte, 4096), dataOff); return err },
		s.Flush,
		func() error { return s.Trim(dataOff, 4096) },
		func() error { return s.WriteZeroes(dataOff, 4096, 0) },
	} {
		if err := call(); !errors.Is(err, slot.ErrMissing) || !errors.Is(err, blockdev.ErrTimeout) {
			t.Errorf("a call after the timeout: %v, want ErrMissing and ErrTimeout", err)
		}
	}
	if d := time.Since(start); d >= timeout {
		t.Errorf("five calls after the timeout took %v: they waited", d)
	}
	if err := s.Reinsert(path); err != nil {
		t.Fatal(err)
	}
	if st := s.State(); st.TimedOut || st.Presence != slot.Present {
		t.Errorf("state after the reinsertion: %+v", st)
	}
	if _, err := s.ReadAt(make([]byte, 4096), dataOff); err != nil {
		t.Errorf("read after the reinsertion: %v", err)
	}

	t.Run("Negative", func(t *testing.T) {
		f := insert(newDrive(t, testSize, sharedHeader()))
		s := newSlot(t, f, slot.Config{Path: absentPath(t), MissingTimeout: -1})
		f.Vanish()
		if _, err := s.WriteAt(make([]byte, 4096), dataOff); !errors.Is(err, slot.ErrMissing) || !errors.Is(err, blockdev.ErrGone) {
			t.Errorf("write to a vanished drive without a wait: %v, want ErrMissing and ErrGone", err)
		}
		if st := s.State(); !st.TimedOut || st.Presence != slot.Missing {
			t.Errorf("state: %+v", st)
		}
	})
}

// TestReinsertRefusesAnotherDrive: a drive of another UUID, of the same UUID with
// another data key, of another size, or with no header at all is refused before
// anything is written to it (its image is unchanged), the device is closed, and the
// slot still waits for its drive.
func TestReinsertRefusesAnotherDrive(t *testing.T) {
	mine := sharedHeader()
	uuid, err := luks2.ReadUUID(bytes.NewReader(mine))
	if err != nil {
		t.Fatal(err)
	}
	mem := newDrive(t, testSize, mine)
	first := insert(mem)
	images := map[string]string{
		"another UUID":     imageFile(t, testSize, formatHeader(t, "")),
		"another data key": imageFile(t, testSize, formatHeader(t, uuid)),
		"another size":     imageFile(t, testSize+4096, mine),
		"no header":        imageFile(t, testSize, make([]byte, headerArea)),
	}
	devs := map[string]*closeCounter{}
	open := func(path string) (blockdev.Device, error) {
		f, err := blockdev.OpenFile(path, blockdev.FileOptions{})
		if err != nil {
			return nil, err
		}
		devs[path] = &closeCounter{Device: f}
		return devs[path], nil
	}
	s := newSlot(t, first, slot.Config{Path: absentPath(t), Open: open})
	// Something to replay, which must not reach another drive.
	if _, err := s.WriteAt(random(65536), dataOff); err != nil {
		t.Fatal(err)
	}
	if err := s.Trim(dataOff+1<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	pull(t, s, first)
	for what, img := range images {
		before := fileSum(t, img)
		err := s.Reinsert(img)
		if !errors.Is(err, slot.ErrNotSameDrive) {
			t.Errorf("Reinsert of a drive with %s: %v, want ErrNotSameDrive", what, err)
		}
		if fileSum(t, img) != before {
			t.Errorf("Reinsert of a drive with %s wrote to it", what)
		}
		if devs[img].closed() != 1 {
			t.Errorf("Reinsert of a drive with %s left it open", what)
		}
	}
	if st := s.State(); st.Presence != slot.Missing || st.Generation != 2 || st.Unflushed != 65536 {
		t.Errorf("state after the refusals: %+v", st)
	}
	if err := s.Reinsert(absentPath(t)); err == nil || errors.Is(err, slot.ErrNotSameDrive) {
		t.Errorf("Reinsert from a path that does not open: %v", err)
	}
}

// TestReinsertReplayFails: a drive that fails the replay or the flush after it is
// closed, and the slot stays missing, with its log, until a reinsertion succeeds.
func TestReinsertReplayFails(t *testing.T) {
	mem := newDrive(t, testSize, sharedHeader())
	first := insert(mem)
	failWrite, failFlush, good := insert(mem), insert(mem), insert(mem)
	failWrite.InjectError(0, testSize, blockdev.FaultWrite, nil)
	failFlush.FailFlush(nil)
	counters := map[string]*closeCounter{"w": {Device: failWrite}, "f": {Device: failFlush}}
	s := newSlot(t, first, slot.Config{Path: absentPath(t), Open: opener(map[string]blockdev.Device{
		"w": counters["w"], "f": counters["f"], "good": good,
	})})
	p := random(4096)
	if _, err := s.WriteAt(p, dataOff); err != nil {
		t.Fatal(err)
	}
	pull(t, s, first)
	for _, path := range []string{"w", "f"} {
		if err := s.Reinsert(path); err == nil || !errors.Is(err, blockdev.ErrMedium) {
			t.Errorf("Reinsert of a drive failing the replay (%s): %v", path, err)
		}
		if counters[path].closed() != 1 {
			t.Errorf("the drive failing the replay (%s) was not closed", path)
		}
		if st := s.State(); st.Presence != slot.Missing || st.Unflushed != 4096 {
			t.Errorf("state after a failed replay: %+v", st)
		}
	}
	if err := s.Reinsert("good"); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "the write replayed", readAll(t, mem, dataOff, 4096), p)
}

// TestStaleGeneration: calls stuck in a drive while it was replaced return only what
// the drive now in the slot answers: whether the old drive fails them (it was closed)
// or answers them, and whether they return before the new drive is in or after, they
// are done again on the new one, and a flush that the old drive answered drops
// nothing from the replay log.
func TestStaleGeneration(t *testing.T) {
	for _, c := range []struct {
		name                    string
		answers, releaseMissing bool
	}{
		{"OldDriveFails", false, false},
		{"OldDriveAnswers", true, false},
		{"OldDriveAnswersWhileMissing", true, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			hdr := sharedHeader()
			oldMem, newMem := newDrive(t, testSize, hdr), newDrive(t, testSize, hdr)
			oldData, newData := random(8192), random(8192)
			oldMem.WriteAt(oldData, dataOff)
			newMem.WriteAt(newData, dataOff)
			old := insert(oldMem)
			var dev blockdev.Device = old
			if c.answers {
				dev = noClose{old}
			}
			path := absentPath(t)
			s := newSlot(t, dev, slot.Config{Path: path, Open: opener(map[string]blockdev.Device{path: insert(newMem)})})
			logged := random(4096)
			if _, err := s.WriteAt(logged, dataOff+1<<20); err != nil {
				t.Fatal(err)
			}

			release := old.Hang()
			defer release()
			read := make([]byte, 8192)
			readDone := returned(func() error { _, err := s.ReadAt(read, dataOff); return err })
			written := random(4096)
			writeDone := returned(func() error { _, err := s.WriteAt(written, dataOff+65536); return err })
			flushDone := returned(s.Flush)
			waitHung(t, old, 3)
			if st := s.Check(); st.Presence != slot.Missing {
				t.Fatalf("Check: %+v", st)
			}
			if c.releaseMissing {
				release()
				for old.Stats().Hung > 0 {
					time.Sleep(time.Millisecond)
				}
				time.Sleep(100 * time.Millisecond)
				for what, ch := range map[string]<-chan error{"read": readDone, "write": writeDone, "flush": flushDone} {
					pending(t, "the stuck "+what, ch)
				}
			}
			if err := s.Reinsert(path); err != nil {
				t.Fatal(err)
			}
			release()
			for what, ch := range map[string]<-chan error{"read": readDone, "write": writeDone, "flush": flushDone} {
				if err := result(t, "the stuck "+what, ch); err != nil {
					t.Errorf("the stuck %s: %v", what, err)
				}
			}
			mustEqual(t, "the stuck read", read, newData)
			if err := s.Flush(); err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "the stuck write on the new drive", readAll(t, newMem, dataOff+65536, 4096), written)
			mustEqual(t, "the logged write on the new drive", readAll(t, newMem, dataOff+1<<20, 4096), logged)
		})
	}
}

// TestCloseWhileWaiting: Close makes the calls that wait for a missing drive fail at
// once with ErrClosed, and every later call and Reinsert too.
func TestCloseWhileWaiting(t *testing.T) {
	mem := newDrive(t, testSize, sharedHeader())
	first := insert(mem)
	path := absentPath(t)
	s, err := slot.New(first, slot.Config{Path: path, Open: opener(map[string]blockdev.Device{path: insert(mem)})})
	if err != nil {
		t.Fatal(err)
	}
	first.Vanish()
	waiting := []<-chan error{
		returned(func() error { _, err := s.ReadAt(make([]byte, 4096), dataOff); return err }),
		returned(func() error { _, err := s.WriteAt(make([]byte, 4096), dataOff); return err }),
		returned(s.Flush),
	}
	waitFor(t, s, "missing", isMissing)
	time.Sleep(100 * time.Millisecond)
	for _, ch := range waiting {
		pending(t, "a call", ch)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for _, ch := range waiting {
		if err := result(t, "a waiting call", ch); !errors.Is(err, blockdev.ErrClosed) {
			t.Errorf("a waiting call after Close: %v, want ErrClosed", err)
		}
	}
	if err := s.Reinsert(path); !errors.Is(err, blockdev.ErrClosed) {
		t.Errorf("Reinsert after Close: %v, want ErrClosed", err)
	}
	if err := s.Close(); !errors.Is(err, blockdev.ErrClosed) {
		t.Errorf("second Close: %v, want ErrClosed", err)
	}
	if st := s.State(); st.Presence != slot.Closed {
		t.Errorf("state after Close: %+v", st)
	}
}

// TestPullAndReinsert: Pull flushes, closes and marks the drive missing; requests wait
// for the reinsertion; Notify sees each change in order and may call the slot.
func TestPullAndReinsert(t *testing.T) {
	mem := newDrive(t, testSize, sharedHeader())
	first := insert(mem)
	counter := &closeCounter{Device: first}
	var mu sync.Mutex
	var seen []slot.State
	var s *slot.Slot
	notify := func(st slot.State) {
		_ = s.State() // Notify runs under none of the slot's locks
		mu.Lock()
		seen = append(seen, st)
		mu.Unlock()
	}
	s = newSlot(t, counter, slot.Config{
		Path: "/dev/sdc", Open: opener(map[string]blockdev.Device{"/dev/sdf": insert(mem)}), Notify: notify,
	})
	if err := s.Reinsert("/dev/sdf"); !errors.Is(err, slot.ErrPresent) {
		t.Errorf("Reinsert of a present drive: %v, want ErrPresent", err)
	}
	p := random(4096)
	if _, err := s.WriteAt(p, dataOff); err != nil {
		t.Fatal(err)
	}
	remove := first.FailFlush(nil)
	if err := s.Pull(""); !errors.Is(err, blockdev.ErrMedium) {
		t.Errorf("Pull with a failing flush: %v", err)
	}
	if st := s.State(); st.Presence != slot.Present || counter.closed() != 0 {
		t.Errorf("after a failed Pull: %+v, closed %d times", st, counter.closed())
	}
	remove()
	if err := s.Pull(""); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "the write flushed by the pull", readAll(t, mem, dataOff, 4096), p)
	st := s.State()
	if st.Presence != slot.Missing || st.Reason != "pulled by the operator" || st.Generation != 2 || st.Path != "/dev/sdc" ||
		st.Unflushed != 0 || counter.closed() != 1 {
		t.Errorf("after Pull: %+v, closed %d times", st, counter.closed())
	}
	if err := s.Pull(""); !errors.Is(err, slot.ErrNotPresent) {
		t.Errorf("Pull of a missing drive: %v, want ErrNotPresent", err)
	}
	if st := s.Check(); st.Presence != slot.Missing || st.Generation != 2 {
		t.Errorf("Check of a missing drive: %+v", st)
	}
	read := make([]byte, 4096)
	done := returned(func() error { _, err := s.ReadAt(read, dataOff); return err })
	time.Sleep(100 * time.Millisecond)
	pending(t, "a read of a pulled drive", done)
	if err := s.Reinsert("/dev/sdf"); err != nil {
		t.Fatal(err)
	}
	if err := result(t, "the waiting read", done); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "the waiting read", read, p)
	st = s.State()
	if st.Presence != slot.Present || st.Path != "/dev/sdf" || st.ReturnedPath != "/dev/sdf" || st.Returned.IsZero() ||
		st.Generation != 3 || st.Reason != "" {
		t.Errorf("after Reinsert: %+v", st)
	}
	s.Close()
	mu.Lock()
	defer mu.Unlock()
	var got []string
	for _, st := range seen {
		got = append(got, fmt.Sprintf("%s/%d", st.Presence, st.Generation))
	}
	if want := "missing/2 present/3 closed/3"; strings.Join(got, " ") != want {
		t.Errorf("Notify saw %v, want %s", got, want)
	}
}

// TestLogLimit: writes that take the replay log past its limit flush the drive, so
// that the log stays bounded.
func TestLogLimit(t *testing.T) {
	const limit = 64 << 10
	f := insert(newDrive(t, testSize, sharedHeader()))
	s := newSlot(t, f, slot.Config{Path: absentPath(t), LogLimit: limit})
	for i := range 64 {
		if _, err := s.WriteAt(random(8192), dataOff+int64(i)*8192); err != nil {
			t.Fatal(err)
		}
		if st := s.State(); st.Unflushed > limit {
			t.Fatalf("after write %d: %d bytes in the replay log, limit %d", i, st.Unflushed, limit)
		}
	}
	// 64 writes of 8 KiB, 512 KiB: at least 512/64 - 1 flushes.
	if n := f.Stats().Flushes; n < 7 {
		t.Errorf("%d flushes for 512 KiB written under a limit of 64 KiB", n)
	}
}

// TestNoLog: without a replay log every change is flushed before it is answered.
func TestNoLog(t *testing.T) {
	f := insert(newDrive(t, testSize, sharedHeader()))
	s := newSlot(t, f, slot.Config{Path: absentPath(t), LogLimit: -1})
	if _, err := s.WriteAt(random(4096), dataOff); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteZeroes(dataOff, 4096, 0); err != nil {
		t.Fatal(err)
	}
	if st := f.Stats(); st.Cached != 0 || st.Flushes != 2 {
		t.Errorf("without a log: %d changes cached, %d flushes; want 0 and 2", st.Cached, st.Flushes)
	}
	if st := s.State(); st.Unflushed != 0 {
		t.Errorf("without a log: %d bytes unflushed", st.Unflushed)
	}
}

// TestNewRefuses: a device without a LUKS2 header makes no slot.
func TestNewRefuses(t *testing.T) {
	if _, err := slot.New(blockdev.NewMem(testSize), slot.Config{Path: "/dev/sdc"}); !errors.Is(err, luks2.ErrNotLUKS) {
		t.Errorf("New over a device without a header: %v, want ErrNotLUKS", err)
	}
}

// TestIdentify: the identity is the UUID and the data key's digest.
func TestIdentify(t *testing.T) {
	hdr := sharedHeader()
	a, err := slot.Identify(newDrive(t, testSize, hdr))
	if err != nil {
		t.Fatal(err)
	}
	b, err := slot.Identify(newDrive(t, 2*testSize, hdr))
	if err != nil {
		t.Fatal(err)
	}
	c, err := slot.Identify(newDrive(t, testSize, formatHeader(t, a.UUID)))
	if err != nil {
		t.Fatal(err)
	}
	if a != b || a.UUID != c.UUID || a.Digest == c.Digest || len(a.Digest) != 2*(32+32) {
		t.Errorf("identities: %+v, %+v, %+v", a, b, c)
	}
}

// TestNotifyMayCallTheSlot: Notify may call Reinsert and Pull (as a node that knows
// where the drive is may do at once), from a pull and from a failed request alike.
func TestNotifyMayCallTheSlot(t *testing.T) {
	mem := newDrive(t, testSize, sharedHeader())
	first := insert(mem)
	path := absentPath(t)
	devs := map[string]blockdev.Device{"/dev/sdf": insert(mem), "/dev/sdg": insert(mem)}
	var s *slot.Slot
	var back atomic.Int64
	notify := func(st slot.State) {
		if st.Presence != slot.Missing {
			return
		}
		next := "/dev/sdf"
		if back.Add(1) == 2 {
			next = "/dev/sdg"
		}
		if err := s.Reinsert(next); err != nil {
			t.Errorf("Reinsert from Notify: %v", err)
		}
	}
	s = newSlot(t, first, slot.Config{Path: path, Open: opener(devs), Notify: notify})
	if err := result(t, "Pull", returned(func() error { return s.Pull("") })); err != nil {
		t.Fatal(err)
	}
	if st := s.State(); st.Presence != slot.Present || st.Path != "/dev/sdf" {
		t.Fatalf("after a Pull that Notify answered: %+v", st)
	}
	// So does a Check that finds the drive gone (no drive is at /dev/sdf here).
	s.Check()
	if st := s.State(); st.Presence != slot.Present || st.Path != "/dev/sdg" || st.Generation != 5 {
		t.Fatalf("after a Check that Notify answered: %+v", st)
	}
}
