package node

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
	"time"
)

// Event types.
const (
	EventDriveAdded       = "drive-added"        // formatted or adopted
	EventDriveAppeared    = "drive-appeared"     // found present (at start, or back)
	EventDriveVanished    = "drive-vanished"     // missing
	EventVolumeState      = "volume-state"       // a volume changed state (Data: state)
	EventVolumeExported   = "volume-exported"    // served under its export names
	EventVolumeRemoved    = "volume-removed"     // removed from the node
	EventRotationStarted  = "rotation-started"   // (Data: old key id)
	EventRotationStep     = "rotation-step"      // (Data: step name)
	EventRotationFinished = "rotation-finished"  // (Data: new key id)
	EventRotationFailed   = "rotation-failed"    // (Message: why)
	EventMigrated         = "keystore-migrated"  // keystore.json version 1 migrated
	EventNodeStarted      = "node-started"       // serving
	EventNodeStopping     = "node-stopping"      // draining
	EventSubscriberBehind = "subscriber-dropped" // this subscriber missed events (Data: how many)
)

// Event is something that happened on the node, for the status API, the web pages and
// the log. Seq numbers the events of one node process, without gaps.
type Event struct {
	Seq     uint64    `json:"seq"`
	Time    time.Time `json:"time"`
	Type    string    `json:"type"`
	Volume  string    `json:"volume,omitempty"` // name
	Drive   string    `json:"drive,omitempty"`  // UUID
	Path    string    `json:"path,omitempty"`
	Data    string    `json:"data,omitempty"`
	Message string    `json:"message"`
}

// subscriberBuffer is how many events a subscriber may fall behind before the oldest
// it has not received are dropped (it then gets one EventSubscriberBehind).
const subscriberBuffer = 256

// bus hands events to subscribers. Publishing never blocks: a subscriber that does not
// keep up loses its oldest events, and is told how many.
type bus struct {
	mu   sync.Mutex
	seq  uint64
	subs map[*subscriber]struct{}
}

type subscriber struct {
	ch      chan Event
	dropped uint64 // under bus.mu
}

func newBus() *bus { return &bus{subs: map[*subscriber]struct{}{}} }

func (b *bus) publish(e Event) Event {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seq++
	e.Seq = b.seq
	for s := range b.subs {
		if s.dropped > 0 {
			select {
			case s.ch <- Event{Seq: e.Seq, Time: e.Time, Type: EventSubscriberBehind, Data: strconv.FormatUint(s.dropped, 10), Message: "events were dropped: this subscriber did not keep up"}:
				s.dropped = 0
			default:
				s.dropped++
				continue
			}
		}
		select {
		case s.ch <- e:
		default:
			s.dropped++
		}
	}
	return e
}

// Subscribe returns a channel of the node's events from now on, closed when ctx ends.
func (n *Node) Subscribe(ctx context.Context) <-chan Event {
	s := &subscriber{ch: make(chan Event, subscriberBuffer)}
	out := make(chan Event)
	n.events.mu.Lock()
	n.events.subs[s] = struct{}{}
	n.events.mu.Unlock()
	go func() {
		defer close(out)
		defer func() {
			n.events.mu.Lock()
			delete(n.events.subs, s)
			n.events.mu.Unlock()
		}()
		for {
			select {
			case e := <-s.ch:
				select {
				case out <- e:
				case <-ctx.Done():
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

// emit publishes an event and logs it.
func (n *Node) emit(e Event) {
	e.Time = n.now()
	e = n.events.publish(e)
	attrs := []any{"event", e.Type}
	for _, kv := range [][2]string{{"volume", e.Volume}, {"drive", e.Drive}, {"path", e.Path}, {"data", e.Data}} {
		if kv[1] != "" {
			attrs = append(attrs, kv[0], kv[1])
		}
	}
	level := slog.LevelInfo
	switch e.Type {
	case EventDriveVanished, EventRotationFailed:
		level = slog.LevelWarn
	case EventRotationStep:
		level = slog.LevelDebug
	}
	n.log.Log(context.Background(), level, e.Message, attrs...)
}
