package access

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"
)

// Session errors (the caller's one line; all Unauthenticated).
var (
	ErrNoSession     = errors.New("no such session (ended, expired with a daemon restart, or from another caller): log in again (cmlctl login)")
	ErrSessionLocked = errors.New("the session is locked: log in again to unlock it (cmlctl login)")
	ErrSessionEnded  = errors.New("the session was ended")
)

// Session is a login: bound to the principal that logged in (a token
// presented from another uid or certificate is no session), locked after
// the policy's idle timeout or by its owner (FTA_SSL.1/.2), ended by its
// owner or an administrator (CR 2.6). Sessions live in cmld's memory: a
// daemon restart ends them all.
type Session struct {
	ID        string
	Account   string
	Principal Principal
	Created   time.Time
	LastUsed  time.Time
	// Locked is why the session is locked ("" = unlocked).
	Locked string

	hash   [32]byte
	ctx    context.Context // cancelled when the session locks or ends
	cancel context.CancelFunc
}

// MaxPerAccount bounds the open sessions of one account (CR 7.1).
const MaxPerAccount = 32

// ErrTooManySessions refuses a login beyond MaxPerAccount.
var ErrTooManySessions = fmt.Errorf("the account has %d sessions open: end one first (cmlctl session list, session end)", MaxPerAccount)

// Sessions holds the open sessions. Its lock guards only memory.
type Sessions struct {
	mu     sync.Mutex
	byHash map[[32]byte]*Session
	byID   map[string]*Session
	// Idle is the inactivity timeout (from the policy, read per call).
	Idle func() time.Duration
	// OnIdleLock, if set, hears of each session locked for inactivity
	// (called without the lock held).
	OnIdleLock func(Session)
	now        func() time.Time
}

// NewSessions returns an empty session table.
func NewSessions(idle func() time.Duration) *Sessions {
	return &Sessions{byHash: map[[32]byte]*Session{}, byID: map[string]*Session{}, Idle: idle, now: time.Now}
}

func tokenHash(tok string) [32]byte { return sha256.Sum256([]byte(tok)) }

// Open starts a session for account from p and returns its token (shown
// once; cmld keeps only its hash).
func (t *Sessions) Open(account string, p Principal) (string, Session, error) {
	raw := make([]byte, 32)
	rand.Read(raw)
	tok := "cml1." + base64.RawURLEncoding.EncodeToString(raw)
	id := make([]byte, 6)
	rand.Read(id)
	now := t.now()
	ctx, cancel := context.WithCancel(context.Background())
	s := &Session{ID: hex.EncodeToString(id), Account: account, Principal: p, Created: now, LastUsed: now, hash: tokenHash(tok), ctx: ctx, cancel: cancel}
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, o := range t.byID {
		if o.Account == account {
			n++
		}
	}
	if n >= MaxPerAccount {
		cancel()
		return "", Session{}, ErrTooManySessions
	}
	t.byHash[s.hash] = s
	t.byID[s.ID] = s
	return tok, s.view(), nil
}

func (s *Session) view() Session {
	return Session{ID: s.ID, Account: s.Account, Principal: s.Principal, Created: s.Created, LastUsed: s.LastUsed, Locked: s.Locked}
}

// idleLocked locks s when it has been idle too long and reports whether
// it did; the caller holds mu.
func (t *Sessions) idleLocked(s *Session, now time.Time) bool {
	if s.Locked == "" && t.Idle != nil && now.Sub(s.LastUsed) > t.Idle() {
		s.Locked = "idle for " + t.Idle().String()
		s.cancel()
		return true
	}
	return false
}

// notify reports sessions locked for inactivity (without mu).
func (t *Sessions) notify(locked []Session) {
	if t.OnIdleLock != nil {
		for _, s := range locked {
			t.OnIdleLock(s)
		}
	}
}

// Use looks a token up for a call from p and counts the call as
// activity. It returns the session and a context that ends when the
// session locks or ends (calls and streams under it end with it).
func (t *Sessions) Use(tok string, p Principal) (Session, context.Context, error) {
	t.mu.Lock()
	s := t.byHash[tokenHash(tok)]
	if s == nil || s.Principal != p {
		t.mu.Unlock()
		return Session{}, nil, ErrNoSession
	}
	now := t.now()
	if t.idleLocked(s, now) {
		v := s.view()
		t.mu.Unlock()
		t.notify([]Session{v})
		return v, nil, ErrSessionLocked
	}
	defer t.mu.Unlock()
	if s.Locked != "" {
		return s.view(), nil, ErrSessionLocked
	}
	s.LastUsed = now
	return s.view(), s.ctx, nil
}

// Touch counts activity on an open stream (an exec's input).
func (t *Sessions) Touch(id string) {
	t.mu.Lock()
	if s := t.byID[id]; s != nil && s.Locked == "" {
		s.LastUsed = t.now()
	}
	t.mu.Unlock()
}

// Unlock reopens a locked session after its owner authenticated again.
func (t *Sessions) Unlock(tok string, p Principal, account string) (Session, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.byHash[tokenHash(tok)]
	if s == nil || s.Principal != p || s.Account != account {
		return Session{}, false
	}
	if s.Locked != "" {
		s.Locked = ""
		s.ctx, s.cancel = context.WithCancel(context.Background())
	}
	s.LastUsed = t.now()
	return s.view(), true
}

// Lock locks a session (its owner's self-lock).
func (t *Sessions) Lock(id, why string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.byID[id]
	if s == nil {
		return false
	}
	if s.Locked == "" {
		s.Locked = why
		s.cancel()
	}
	return true
}

// End ends a session: calls and streams under it are cancelled.
func (t *Sessions) End(id string) (Session, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.byID[id]
	if s == nil {
		return Session{}, false
	}
	t.endLocked(s)
	return s.view(), true
}

func (t *Sessions) endLocked(s *Session) {
	s.cancel()
	delete(t.byID, s.ID)
	delete(t.byHash, s.hash)
}

// EndAccount ends every session of an account (locked, removed, or its
// password reset by an administrator) and returns how many.
func (t *Sessions) EndAccount(name string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, s := range t.byID {
		if s.Account == name {
			t.endLocked(s)
			n++
		}
	}
	return n
}

// Get returns one session.
func (t *Sessions) Get(id string) (Session, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.byID[id]
	if s == nil {
		return Session{}, false
	}
	t.idleLocked(s, t.now())
	return s.view(), true
}

// List returns the sessions (of account, or all for ""), oldest first.
func (t *Sessions) List(account string) []Session {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	var out []Session
	for _, s := range t.byID {
		t.idleLocked(s, now)
		if account == "" || s.Account == account {
			out = append(out, s.view())
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out
}

// Run locks idle sessions as their time comes (so streams under them end
// without waiting for the next call) until ctx ends.
func (t *Sessions) Run(ctx context.Context, every time.Duration) {
	tk := time.NewTicker(every)
	defer tk.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tk.C:
			t.mu.Lock()
			now := t.now()
			var locked []Session
			for _, s := range t.byID {
				if t.idleLocked(s, now) {
					locked = append(locked, s.view())
				}
			}
			t.mu.Unlock()
			t.notify(locked)
		}
	}
}
