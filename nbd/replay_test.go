package nbd

import (
	"bytes"
	"testing"
)

// TestReplayLogBuffers: the pooled copy of a write stays intact while a replay holds a
// snapshot, even when a Flush drops its entry meanwhile; the buffer goes back to the
// pool only when the last replay ends, and dropped entries free their bytes.
func TestReplayLogBuffers(t *testing.T) {
	l := &replayLog{limit: 1 << 20}
	data := bytes.Repeat([]byte("atrest"), 1000)
	cl := &call{typ: cmdWrite, off: 4096, length: uint32(len(data)), buf: data}
	e := l.add(cl)
	clear(data) // the caller reuses its buffer: the log has its own copy
	l.finish(e, nil)
	if l.bytes != int64(len(data))+entryOverhead {
		t.Fatalf("log holds %d bytes", l.bytes)
	}

	snap := l.snapshot()
	snap2 := l.snapshot() // two replays at once (a reconnect that retries)
	if len(snap) != 1 || !bytes.Equal(snap[0].data, bytes.Repeat([]byte("atrest"), 1000)) {
		t.Fatalf("snapshot %+v", snap)
	}
	if lost := l.flushed(l.startFlush()); lost || len(l.entries) != 0 || l.bytes != 0 {
		t.Fatalf("after flush: lost %v, %d entries, %d bytes", lost, len(l.entries), l.bytes)
	}
	if len(l.parked) != 1 {
		t.Fatalf("%d buffers parked during the replay, want 1", len(l.parked))
	}
	l.endReplay()
	if len(l.parked) != 1 {
		t.Fatal("buffer recycled while a replay still runs")
	}
	if !bytes.Equal(snap2[0].data, bytes.Repeat([]byte("atrest"), 1000)) {
		t.Fatal("snapshot data changed")
	}
	l.endReplay()
	if len(l.parked) != 0 {
		t.Fatalf("%d buffers still parked after the replays", len(l.parked))
	}

	// Without a replay, dropped buffers go back at once; dropAll drops pending ones too.
	e = l.add(cl)
	l.add(&call{typ: cmdTrim, off: 0, length: 4096})
	l.dropAll()
	if len(l.parked) != 0 || l.bytes != 0 || e.data != nil {
		t.Fatalf("dropAll: %d parked, %d bytes", len(l.parked), l.bytes)
	}
	l.finish(e, nil) // a late answer to a dropped entry changes nothing
	if lost := l.flushed(l.startFlush()); !lost {
		t.Fatal("dropAll did not report lost writes")
	}
}
