// Package audit records security-relevant events with a fixed schema.
//
// Every management operation of cmld goes through Recorder. This package
// provides the event schema and an append-only JSON-lines sink; tamper
// evidence, capacity limits, forwarding and the auditor role plug in behind
// the same Recorder interface (TSF-AUDIT, CR 2.8). It is not the diagnostic
// log: that is slog, a separate stream.
package audit

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"
	"unicode/utf8"
)

// Outcome of an audited operation.
const (
	Success = "success"
	Failure = "failure"
)

// Subject identifies who caused an event: the peer of the control socket.
type Subject struct {
	UID int32 `json:"uid"`
	GID int32 `json:"gid"`
	PID int32 `json:"pid"`
}

// Event is one audit record. Fields are fixed; add new ones, never rename.
type Event struct {
	Time      time.Time `json:"time"`
	Type      string    `json:"type"`              // "management", "container", "daemon"
	Operation string    `json:"operation"`         // e.g. "container.start"
	Subject   *Subject  `json:"subject,omitempty"` // nil for events the daemon causes itself
	Object    string    `json:"object,omitempty"`  // container name/uuid, guest OS name:version
	Outcome   string    `json:"outcome"`           // Success or Failure
	Reason    string    `json:"reason,omitempty"`  // why it failed, or what happened
	Details   string    `json:"details,omitempty"` // extra context, never secrets
	// ExitCode and ExitSignal say how a container's init ended: an exit
	// code (exit 130 is code 130) or the signal that killed it, never both.
	ExitCode   *int `json:"exit_code,omitempty"`
	ExitSignal int  `json:"exit_signal,omitempty"`
}

// Recorder takes audit events. Record must not block for long; a sink that
// cannot store an event reports the error so the caller can fail closed.
type Recorder interface {
	Record(ctx context.Context, e Event) error
}

// FileSink appends events as JSON lines to a file opened O_APPEND, so a
// record is never overwritten by the daemon, and syncs after each record.
type FileSink struct {
	mu  sync.Mutex
	f   *os.File
	now func() time.Time
}

// OpenFile opens (creating 0600 if needed) the JSON-lines audit file at path.
func OpenFile(path string, now func() time.Time) (*FileSink, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	if now == nil {
		now = time.Now
	}
	return &FileSink{f: f, now: now}, nil
}

// Bounds on the text fields of a record: values a client chose (names,
// paths, arguments) are kept to a prefix, so a 60,000-byte name cannot
// make a 60,000-byte record.
const (
	MaxObject = 256
	MaxReason = 1024
)

// Bound shortens s to at most max bytes (on a UTF-8 boundary), marking the
// cut with how much was left out.
func Bound(s string, max int) string {
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s... (%d bytes)", s[:cut], len(s))
}

// Record appends e, filling in the time if unset.
func (s *FileSink) Record(_ context.Context, e Event) error {
	e.Operation = Bound(e.Operation, 64)
	e.Object = Bound(e.Object, MaxObject)
	e.Reason = Bound(e.Reason, MaxReason)
	e.Details = Bound(e.Details, MaxReason)
	if e.Time.IsZero() {
		e.Time = s.now()
	}
	e.Time = e.Time.UTC()
	b, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("encode audit event: %w", err)
	}
	b = append(b, '\n')
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.f.Write(b); err != nil {
		return fmt.Errorf("write audit log: %w", err)
	}
	return s.f.Sync()
}

// Close closes the file.
func (s *FileSink) Close() error { return s.f.Close() }

type subjectKey struct{}

// WithSubject returns ctx carrying the caller identity for audit records.
func WithSubject(ctx context.Context, s Subject) context.Context {
	return context.WithValue(ctx, subjectKey{}, s)
}

// SubjectFrom returns the caller identity in ctx, or nil.
func SubjectFrom(ctx context.Context) *Subject {
	if s, ok := ctx.Value(subjectKey{}).(Subject); ok {
		return &s
	}
	return nil
}
