// Package audit records security-relevant events with a fixed schema.
//
// Every management operation of cmld goes through Recorder. This package
// provides the event schema and an append-only JSON-lines sink; tamper
// evidence, capacity limits, forwarding and the auditor role plug in behind
// the same Recorder interface (TSF-AUDIT, CR 2.8). It is not the diagnostic
// log: that is slog, a separate stream.
package audit

import (
	"bytes"
	"context"
	"crypto"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/cmlproject/cml/internal/auditlog"
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
	// Account is the caller's cmld account (CR 2.12).
	Account string `json:"account,omitempty"`
	// Certificate and Remote identify a caller over the remote API: its
	// client certificate's subject and its address (UID and GID are -1).
	Certificate string `json:"certificate,omitempty"`
	Remote      string `json:"remote,omitempty"`
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
	// Seq numbers the records of a trail from 1, never repeating, also
	// across restarts; Chain links each record to the one before
	// (internal/auditlog). The sink sets both; Chain is the last field.
	Seq   uint64 `json:"seq"`
	Chain string `json:"chain"`
}

// Recorder takes audit events. Record must not block for long; a sink that
// cannot store an event reports the error so the caller can fail closed.
type Recorder interface {
	Record(ctx context.Context, e Event) error
}

// FileSink is the tamper-evident trail (docs/audit.md): JSON lines in a
// file opened O_APPEND, each record with its sequence number and hash
// chain, the leaves of a Merkle tree whose size and root are signed at
// checkpoints (<file>.checkpoints) once a signer is set. Writers share
// fsyncs (group commit): Record returns when its record is durable.
type FileSink struct {
	mu    sync.Mutex // guards seq, chain, tree, off, pend, epoch, durable
	f     *os.File
	path  string
	now   func() time.Time
	seq   uint64
	chain [32]byte
	tree  auditlog.Tree
	off   int64  // bytes recorded: in the file, or pending
	pend  []byte // records taken but not yet written (the next commit's)
	// epoch counts failed commits: a record taken in an earlier epoch
	// was dropped with its batch.
	epoch   uint64
	lastErr error
	// ended holds how each earlier epoch ended: what was durable, and
	// the error its failed commit gave.
	ended map[uint64]epochEnd
	// broken: a failed commit could not be cut back out of the file;
	// nothing more is recorded until the trail is opened again.
	broken bool
	// durable is the state as of the last commit: what a failed commit
	// rolls back to, and what checkpoints sign.
	durable sinkState

	// One commit (write and fdatasync) at a time: its leader sets
	// committing; the writers it covers wait for commitDone to close.
	committing bool
	commitDone chan struct{}
	synced     int64 // bytes known durable

	ckMu       sync.Mutex // checkpoint signing and its file
	signer     crypto.Signer
	origin     string
	every      uint64
	signedAt   uint64 // tree size of the last checkpoint
	kick       chan struct{}
	done       chan struct{}
	appendOnly atomic.Bool // chattr +a is kept on the trail

	// Capacity (SetCapacity): bytes, 0 = the filesystem's free space.
	capacity int64
	warns    []int // percentages, ascending
	warned   int   // how many of warns were crossed
	failed   bool  // a write failed or the trail is full
	onFull   func(reason string)
	onWarn   func(pct int)
	fullOnce sync.Once
	onAlert  func(record string)
	// Torn is the incomplete last record a crash left, moved aside at
	// open (empty when there was none).
	Torn string
}

type epochEnd struct {
	synced int64
	err    error
}

// sinkState is the trail's state after some record.
type sinkState struct {
	seq   uint64
	chain [32]byte
	tree  auditlog.Tree
}

func (s *FileSink) state() sinkState {
	st := sinkState{seq: s.seq, chain: s.chain}
	st.tree.Restore(s.tree.State())
	return st
}

// OpenFile opens (creating 0600 if needed) the audit trail at path and
// takes up its sequence, chain and tree. An incomplete last record (a
// crash mid-write) is moved to <path>.torn-<time> and cut off, never glued
// to the next record.
func OpenFile(path string, now func() time.Time) (*FileSink, error) {
	if now == nil {
		now = time.Now
	}
	s := &FileSink{path: path, now: now, every: 1000, kick: make(chan struct{}, 1), commitDone: make(chan struct{})}
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	if n := len(b); n > 0 && b[n-1] != '\n' {
		// Even root must lift the append-only attribute to cut a file.
		SetAppendOnly(path, false)
		cut := bytes.LastIndexByte(b, '\n') + 1
		s.Torn = fmt.Sprintf("%s.torn-%d", path, now().Unix())
		if err := os.WriteFile(s.Torn, b[cut:], 0o600); err != nil {
			return nil, fmt.Errorf("audit log: keep the torn record: %w", err)
		}
		if err := os.Truncate(path, int64(cut)); err != nil {
			return nil, fmt.Errorf("audit log: cut the torn record: %w", err)
		}
		b = b[:cut]
	}
	for i, line := range bytes.Split(b, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var rec struct {
			Seq       uint64 `json:"seq"`
			Operation string `json:"operation"`
			Details   string `json:"details"`
		}
		json.Unmarshal(line, &rec)
		if i == 0 && rec.Operation == auditlog.RotateOperation {
			// Earlier records were rotated away: take up their state.
			t, c, err := auditlog.DecodeRotate(rec.Details)
			if err != nil {
				return nil, fmt.Errorf("open audit log: %w", err)
			}
			s.tree, s.chain, s.seq = t, c, t.Size()
		}
		if rec.Seq > s.seq {
			s.seq = rec.Seq
		} else {
			s.seq++ // records from before sequence numbers
		}
		if _, v, ok := auditlog.Blank(line); ok {
			if c, err := hex.DecodeString(v); err == nil && len(c) == 32 {
				copy(s.chain[:], c)
			}
		}
		s.tree.Append(auditlog.LeafHash(line))
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	s.f, s.off, s.synced = f, int64(len(b)), int64(len(b))
	s.durable = s.state()
	return s, nil
}

// AppendOnly makes the trail and its checkpoints append-only where the
// filesystem supports it (chattr +a): even root must remove the attribute
// before changing or deleting a record. It reports whether it could.
func (s *FileSink) AppendOnly() bool {
	s.ckMu.Lock()
	s.appendOnly.Store(true)
	s.ckMu.Unlock()
	SetAppendOnly(s.path+".checkpoints", true)
	return SetAppendOnly(s.path, true)
}

// SetAppendOnly sets or clears a file's append-only attribute (FS_APPEND_FL);
// it reports false where the filesystem or the caller cannot.
func SetAppendOnly(path string, on bool) bool {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	flags, err := unix.IoctlGetUint32(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err != nil {
		return false
	}
	if on {
		flags |= fsAppendFL
	} else {
		flags &^= fsAppendFL
	}
	return unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags)) == nil
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

// Record appends e, filling in the time if unset, and returns once the
// record is on disk.
func (s *FileSink) Record(_ context.Context, e Event) error {
	e.Operation = Bound(e.Operation, 64)
	e.Object = Bound(e.Object, MaxObject)
	e.Reason = Bound(e.Reason, MaxReason)
	e.Details = Bound(e.Details, MaxReason)
	if e.Time.IsZero() {
		e.Time = s.now()
	}
	e.Time = e.Time.UTC()
	// Encoded outside the lock; under it only the tail is written.
	head, err := encodeHead(e)
	if err != nil {
		return err
	}
	s.mu.Lock()
	if s.broken {
		err := s.lastErr
		s.mu.Unlock()
		return err
	}
	seq := s.seq + 1
	line, next := chainLine(head, seq, s.chain)
	if s.capacity > 0 && s.off+int64(len(line)) > s.capacity {
		s.failed = true
		s.mu.Unlock()
		s.full("the audit trail reached its capacity (audit_size)")
		return ErrFull
	}
	// Taken: the next commit writes it with the others taken meanwhile,
	// in one write and one fdatasync (group commit).
	s.pend = append(s.pend, line...)
	s.seq, s.chain = seq, next
	s.tree.Append(auditlog.LeafHash(line[:len(line)-1]))
	s.off += int64(len(line))
	end, size, epoch := s.off, s.tree.Size(), s.epoch
	alert := s.onAlert != nil && Integrity(e)
	var crossed []int
	if s.capacity > 0 {
		for s.warned < len(s.warns) && s.off*100 >= int64(s.warns[s.warned])*s.capacity {
			crossed = append(crossed, s.warns[s.warned])
			s.warned++
		}
	}
	s.mu.Unlock()
	for _, pct := range crossed {
		s.Record(context.Background(), Event{Type: "daemon", Operation: "audit.capacity", Outcome: Failure,
			Reason: fmt.Sprintf("the audit trail is over %d%% of its capacity (%d MB)", pct, s.capacity>>20)})
		if s.onWarn != nil {
			s.onWarn(pct)
		}
	}
	if err := s.commit(end, epoch); err != nil {
		return err
	}
	if alert {
		s.onAlert(string(line[:len(line)-1]))
	}
	if s.signer != nil && size%s.every == 0 {
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
	return nil
}

// Integrity reports the records of integrity violations: refused images
// and configs, failed measurements, tampered volumes, a trail that does
// not verify (CR 3.4(2): pushed as alerts and forwarded as critical).
func Integrity(e Event) bool {
	if e.Outcome != Failure {
		return false
	}
	switch e.Operation {
	case "container.verify", "container.measure", "storage.integrity", "audit.verify", "audit.torn":
		return true
	}
	return false
}

// OnAlert sets where integrity violations are pushed once recorded.
func (s *FileSink) OnAlert(f func(record string)) {
	s.mu.Lock()
	s.onAlert = f
	s.mu.Unlock()
}

// encodeHead encodes e up to its last two fields, the sequence number and
// the chain value, which chainLine adds.
func encodeHead(e Event) ([]byte, error) {
	e.Seq, e.Chain = 0, ""
	enc, err := json.Marshal(e)
	if err != nil {
		return nil, fmt.Errorf("encode audit event: %w", err)
	}
	const tail = `,"seq":0,"chain":""}`
	if !bytes.HasSuffix(enc, []byte(tail)) {
		return nil, fmt.Errorf("encode audit event: unexpected layout")
	}
	return enc[:len(enc)-len(tail)], nil
}

// chainLine completes a head into the record line (with its newline):
// sequence number seq, and the chain value over prev and the record with
// that value empty.
func chainLine(head []byte, seq uint64, prev [32]byte) (line []byte, next [32]byte) {
	blank := fmt.Appendf(head[:len(head):len(head)], `,"seq":%d,"chain":""}`, seq)
	next = auditlog.Chain(prev, blank)
	return fmt.Appendf(blank[:len(blank)-len(`""}`)], `"%x"}`+"\n", next[:]), next
}

// ErrFull is a record refused because the trail is at its capacity.
var ErrFull = errors.New("the audit trail is full")

// reserve is the room kept for the records of operations already running
// when Full starts refusing new ones.
const reserve = 16 << 10

// SetCapacity sets the trail's capacity in bytes (0: the filesystem's
// free space), warning percentages, and what to do when full: onFull runs
// once, the first time a record cannot be written.
func (s *FileSink) SetCapacity(bytes int64, warns []int, onFull func(reason string), onWarn func(pct int)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.capacity, s.warns, s.onFull, s.onWarn = bytes, warns, onFull, onWarn
	for s.warned < len(s.warns) && s.capacity > 0 && s.off*100 >= int64(s.warns[s.warned])*s.capacity {
		s.warned++
	}
}

// Full reports whether an operation that must be audited should be
// refused now: the trail is within reserve of its capacity or of the
// filesystem's free space, or a write failed. Checked before an
// operation runs, so that it never runs unrecorded.
func (s *FileSink) Full() bool {
	s.mu.Lock()
	failed, c, off := s.failed, s.capacity, s.off
	s.mu.Unlock()
	var why string
	var st unix.Statfs_t
	switch {
	case failed:
		why = "writing the audit trail failed"
	case c > 0 && off+reserve > c:
		why = "the audit trail reached its capacity (audit_size)"
	case unix.Fstatfs(int(s.f.Fd()), &st) == nil && int64(st.Bavail)*int64(st.Bsize) < reserve:
		why = "the audit trail's filesystem is full"
	default:
		return false
	}
	s.full(why)
	return true
}

// Recovered clears a failure once space was made (an auditor archived
// the trail, or the filesystem has room again); it reports whether the
// trail takes records again.
func (s *FileSink) Recovered() bool {
	s.mu.Lock()
	if s.broken {
		s.mu.Unlock()
		return false
	}
	s.failed = false
	s.mu.Unlock()
	return !s.Full()
}

func (s *FileSink) full(reason string) {
	if s.onFull != nil {
		s.fullOnce.Do(func() { go s.onFull(reason) })
	}
}

// commit makes the trail durable up to end, for a record taken in epoch:
// one write of every record taken so far and one fdatasync serve all
// their writers (group commit). When the write or the fdatasync fails,
// the file is cut back to its last durable length and the trail's state
// rolled back to it: every record of the batch (and any taken after it,
// which chain on it) is dropped, and its writer gets the error, so no
// record is ever acknowledged that the file does not hold, and the chain
// never skips one.
func (s *FileSink) commit(end int64, epoch uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		switch {
		case s.epoch != epoch:
			// The record's epoch ended with a failed commit: it is
			// durable if an earlier commit had written it, else it was
			// dropped.
			e, ok := s.ended[epoch]
			if ok && end <= e.synced {
				return nil
			}
			if !ok {
				return s.lastErr
			}
			return e.err
		case s.synced >= end:
			return nil
		case s.committing:
			// Another writer's commit is under way: wait for it, then
			// see whether it covered this record.
			ch := s.commitDone
			s.mu.Unlock()
			<-ch
			s.mu.Lock()
			continue
		}
		// Lead the next commit: everything taken so far.
		s.committing = true
		buf, upTo, st := s.pend, s.off, s.state()
		s.pend = nil
		s.mu.Unlock()
		err := s.flush(buf)
		s.mu.Lock()
		if err != nil {
			s.rollback(err)
		} else {
			s.synced, s.durable = upTo, st
		}
		s.committing = false
		close(s.commitDone)
		s.commitDone = make(chan struct{})
	}
}

// waitCommit waits, with mu held, until no commit is under way.
func (s *FileSink) waitCommit() {
	for s.committing {
		ch := s.commitDone
		s.mu.Unlock()
		<-ch
		s.mu.Lock()
	}
}

// flush writes buf and makes the file durable; the caller leads the
// commit (or holds mu with none under way).
func (s *FileSink) flush(buf []byte) error {
	if _, err := s.f.Write(buf); err != nil {
		return fmt.Errorf("write audit log: %w", err)
	}
	if err := unix.Fdatasync(int(s.f.Fd())); err != nil {
		return fmt.Errorf("sync audit log: %w", err)
	}
	return nil
}

// rollback drops what is not durable after a failed commit; mu is held
// and no other commit is under way.
func (s *FileSink) rollback(err error) {
	// Cut the file back (lifting append-only for it, as a rotation
	// does). If even that fails, the file and the state may differ:
	// the trail takes no more records until a restart re-reads it.
	if st, serr := s.f.Stat(); serr != nil || st.Size() != s.synced {
		if s.appendOnly.Load() {
			SetAppendOnly(s.path, false)
		}
		if terr := s.f.Truncate(s.synced); terr != nil {
			s.broken = true
			err = fmt.Errorf("%w (and cutting the trail back failed: %v; restart cmld)", err, terr)
		}
		if s.appendOnly.Load() {
			SetAppendOnly(s.path, true)
		}
	}
	s.seq, s.chain = s.durable.seq, s.durable.chain
	s.tree.Restore(s.durable.tree.State())
	s.off, s.pend = s.synced, nil
	if s.ended == nil {
		s.ended = map[uint64]epochEnd{}
	}
	s.ended[s.epoch] = epochEnd{synced: s.synced, err: err}
	s.epoch++
	s.lastErr = err
	s.failed = true
	s.full("writing the audit trail failed: " + err.Error())
}

// SetSigner starts checkpoints: the tree's size and root signed with
// signer (the device's TPM-held key) every `every` records, every
// `interval`, and at Close, appended to <file>.checkpoints.
func (s *FileSink) SetSigner(signer crypto.Signer, origin string, every uint64, interval time.Duration) {
	if every == 0 {
		every = 1000
	}
	s.ckMu.Lock()
	s.signer, s.origin, s.every = signer, origin, every
	s.ckMu.Unlock()
	s.done = make(chan struct{})
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-s.done:
				return
			case <-t.C:
			case <-s.kick:
			}
			s.Checkpoint()
		}
	}()
}

// Checkpoint signs the tree as it is now, unless it was signed at this
// size already.
func (s *FileSink) Checkpoint() error {
	s.ckMu.Lock()
	defer s.ckMu.Unlock()
	if s.signer == nil {
		return nil
	}
	// Only what is durable: a checkpoint never covers a record a crash
	// could still take away.
	s.mu.Lock()
	c := s.checkpointOf(&s.durable.tree)
	s.mu.Unlock()
	if c.Size == s.signedAt {
		return nil
	}
	return s.appendCheckpoint(c)
}

// checkpointOf is the (unsigned) checkpoint of tree, now.
func (s *FileSink) checkpointOf(t *auditlog.Tree) auditlog.Checkpoint {
	return auditlog.Checkpoint{Origin: s.origin, Size: t.Size(), Root: t.Root(), Time: s.now().Unix()}
}

// appendCheckpoint signs c and appends it, durable, to the checkpoints
// file; ckMu is held.
func (s *FileSink) appendCheckpoint(c auditlog.Checkpoint) error {
	note, err := auditlog.Sign(c, s.signer)
	if err != nil {
		return err
	}
	line, _ := json.Marshal(struct {
		Note string `json:"note"`
	}{string(note)})
	f, err := os.OpenFile(s.path+".checkpoints", os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if s.appendOnly.Load() {
		SetAppendOnly(s.path+".checkpoints", true)
	}
	if _, err := f.Write(append(line, '\n')); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	s.signedAt = c.Size
	return nil
}

// Close writes a last checkpoint and closes the file.
func (s *FileSink) Close() error {
	s.mu.Lock()
	end, epoch := s.off, s.epoch
	s.mu.Unlock()
	s.commit(end, epoch)
	if s.done != nil {
		close(s.done)
		s.Checkpoint()
	}
	return s.f.Close()
}

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

// Path is the trail's file; checkpoints are in Path()+".checkpoints".
func (s *FileSink) Path() string { return s.path }

// Status is the trail's size in records and bytes, and its last
// checkpoint's size and time.
func (s *FileSink) Status() (records uint64, size int64, signed uint64, signedAt int64) {
	s.mu.Lock()
	records, size = s.seq, s.off
	s.mu.Unlock()
	s.ckMu.Lock()
	signed = s.signedAt
	s.ckMu.Unlock()
	if b, err := os.ReadFile(s.path + ".checkpoints"); err == nil {
		if notes, err := auditlog.ReadCheckpoints(b); err == nil && len(notes) > 0 {
			if c, err := auditlog.Open(notes[len(notes)-1], []crypto.PublicKey{s.Public()}); err == nil {
				signed, signedAt = c.Size, c.Time
			}
		}
	}
	return
}

// Public is the key checkpoints are signed with (nil before SetSigner).
func (s *FileSink) Public() crypto.PublicKey {
	s.ckMu.Lock()
	defer s.ckMu.Unlock()
	if s.signer == nil {
		return nil
	}
	return s.signer.Public()
}

// fsAppendFL is FS_APPEND_FL of linux/fs.h (chattr +a).
const fsAppendFL = 0x00000020

// Capacity is the trail's capacity in bytes (0: the filesystem's).
func (s *FileSink) Capacity() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.capacity
}

// Rotate ends the live trail after the collector has it: with a
// checkpoint signed at its end, the file is replaced by a new one whose
// first record (audit.rotate) carries the tree and chain state, so that
// verification goes on; the old records are deleted, their space freed.
// confirmed says whether the collector holds the first n bytes; it is
// called with the trail's lock held and everything taken written.
func (s *FileSink) Rotate(confirmed func(n int64) bool) error {
	return s.RotateAfter(confirmed, "the collector received them")
}

// RotateAfter is Rotate with the reason the records could go (after
// whom), for the rotation record.
func (s *FileSink) RotateAfter(confirmed func(n int64) bool, after string) error {
	s.ckMu.Lock()
	defer s.ckMu.Unlock()
	// The rotation point must be under a signed checkpoint. The TPM signs
	// outside the trail's lock, so records go on meanwhile; if some came
	// in, it signs again; only a trail that moved under three signatures
	// in a row gets its last one under the lock (one bounded TPM call).
	for try := 0; ; try++ {
		s.mu.Lock()
		// No commit under way (none starts while mu is held), and what
		// is taken but not written goes first, so that the rotation
		// point is in the file.
		s.waitCommit()
		if len(s.pend) > 0 {
			if err := s.flush(s.pend); err != nil {
				s.rollback(err)
				s.mu.Unlock()
				return err
			}
			s.synced, s.durable, s.pend = s.off, s.state(), nil
		}
		if !confirmed(s.off) {
			s.mu.Unlock()
			return fmt.Errorf("the collector has not confirmed the trail yet")
		}
		if s.signer == nil || s.signedAt == s.tree.Size() || try == 3 {
			break // with mu held
		}
		c := s.checkpointOf(&s.tree)
		s.mu.Unlock()
		if err := s.appendCheckpoint(c); err != nil {
			return fmt.Errorf("checkpoint before rotation: %w", err)
		}
	}
	defer s.mu.Unlock()
	if s.signer != nil && s.signedAt != s.tree.Size() {
		c := s.checkpointOf(&s.tree)
		if err := s.appendCheckpoint(c); err != nil {
			return fmt.Errorf("checkpoint before rotation: %w", err)
		}
	}
	e := Event{Time: s.now().UTC(), Type: "daemon", Operation: auditlog.RotateOperation, Outcome: Success,
		Reason:  fmt.Sprintf("records 1 to %d were rotated away after %s", s.seq, after),
		Details: auditlog.EncodeRotate(&s.tree, s.chain), Seq: s.seq + 1}
	head, err := encodeHead(e)
	if err != nil {
		return err
	}
	line, next := chainLine(head, e.Seq, s.chain)
	tmp := s.path + ".rotating"
	if err := os.WriteFile(tmp, line, 0o600); err != nil {
		os.Remove(tmp)
		return err
	}
	SetAppendOnly(s.path, false)
	if err := os.Rename(tmp, s.path); err != nil {
		os.Remove(tmp)
		SetAppendOnly(s.path, s.appendOnly.Load())
		return err
	}
	f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	s.f.Close()
	s.f = f
	if s.appendOnly.Load() {
		SetAppendOnly(s.path, true)
	}
	s.seq, s.chain = e.Seq, next
	s.tree.Append(auditlog.LeafHash(line[:len(line)-1]))
	s.off, s.synced = int64(len(line)), int64(len(line))
	s.durable = s.state()
	s.failed, s.warned = false, 0
	s.fullOnce = sync.Once{}
	return nil
}
