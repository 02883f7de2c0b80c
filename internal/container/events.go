package container

import (
	"sync"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
)

// broker fans state changes out to subscribers. A subscriber that falls
// more than its buffer behind is dropped (its channel closed) rather than
// stalling the daemon; it resubscribes and reads the current state.
type broker struct {
	mu   sync.Mutex
	subs map[chan *cmlv1.Event]struct{}
}

func newBroker() *broker { return &broker{subs: map[chan *cmlv1.Event]struct{}{}} }

func (b *broker) subscribe() chan *cmlv1.Event {
	ch := make(chan *cmlv1.Event, 256)
	b.mu.Lock()
	b.subs[ch] = struct{}{}
	b.mu.Unlock()
	return ch
}

func (b *broker) unsubscribe(ch chan *cmlv1.Event) {
	b.mu.Lock()
	if _, ok := b.subs[ch]; ok {
		delete(b.subs, ch)
		close(ch)
	}
	b.mu.Unlock()
}

func (b *broker) publish(e *cmlv1.Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for ch := range b.subs {
		select {
		case ch <- e:
		default:
			delete(b.subs, ch)
			close(ch)
		}
	}
}
