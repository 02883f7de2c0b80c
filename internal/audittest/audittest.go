// Package audittest provides an in-memory audit.Recorder for tests: it
// keeps every event and fails on demand (a full disk, say). It is for
// tests only.
package audittest

import (
	"context"
	"sync"

	"github.com/cmlproject/cml/internal/audit"
)

// Recorder keeps audit events in memory.
type Recorder struct {
	mu     sync.Mutex
	events []audit.Event
	fail   error
}

// Record implements audit.Recorder; it returns the injected failure, if
// any, and then keeps nothing.
func (r *Recorder) Record(_ context.Context, e audit.Event) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail != nil {
		return r.fail
	}
	r.events = append(r.events, e)
	return nil
}

// Fail makes every Record fail with err until Fail(nil).
func (r *Recorder) Fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fail = err
}

// Events returns a copy of the events recorded so far.
func (r *Recorder) Events() []audit.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]audit.Event(nil), r.events...)
}

// Operations lists "operation outcome" of each event, in order.
func (r *Recorder) Operations() []string {
	var out []string
	for _, e := range r.Events() {
		out = append(out, e.Operation+" "+e.Outcome)
	}
	return out
}
