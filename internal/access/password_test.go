package access

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

var local1000 = Principal{Local: true, UID: 1000}

func TestPasswordPolicy(t *testing.T) {
	p := DefaultPolicy()
	for pw, want := range map[string]string{
		"Sh0rt!":                 "too short",
		"alllowercaseletters":    "character classes",
		"alllowercase1234":       "character classes",
		"Xx1-operator-password":  "account name",
		"\xff\xfeInvalidUTF8abc": "UTF-8",
		"Correct-Horse-42":       "",
	} {
		err := p.Check("operator", []byte(pw))
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("%q: %v, want %q", pw, err, want)
		}
	}
	for _, bad := range []Policy{{MinLength: 7, MinClasses: 3, History: 6, MaxFailures: 5, IdleTimeoutSeconds: 60},
		{MinLength: 12, MinClasses: 3, History: 5, MaxFailures: 5, IdleTimeoutSeconds: 60},
		{MinLength: 12, MinClasses: 5, History: 6, MaxFailures: 5, IdleTimeoutSeconds: 60},
		{MinLength: 12, MinClasses: 3, History: 6, MaxFailures: 0, IdleTimeoutSeconds: 60},
		{MinLength: 12, MinClasses: 3, History: 6, MaxFailures: 5, IdleTimeoutSeconds: 1}} {
		if bad.Valid() == nil {
			t.Errorf("policy %+v accepted", bad)
		}
	}
}

// TestLoginLockoutAndHistory: the attacker guesses. Wrong passwords count
// and lock at max_failures (the right password then fails too, with the
// same answer); an administrator's unlock lets it in; an expired or
// administrator-set password must be replaced; the last 6 are refused.
func TestLoginLockoutAndHistory(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	pw := []byte("Initial-Passw0rd")
	if err := s.Add(Account{Name: "op", Roles: []Role{User}}, []byte("short")); err == nil {
		t.Fatal("an account with a password against the policy was added")
	}
	if _, ok := s.Get("op"); ok {
		t.Fatal("a refused add left the account")
	}
	if err := s.Add(Account{Name: "op", Roles: []Role{User}, LocalUIDs: []int{1000}}, pw); err != nil {
		t.Fatal(err)
	}
	// Set by an administrator: must change at the first login.
	if _, err := s.Authenticate(local1000, "op", pw, nil); !errors.Is(err, ErrPasswordExpired) {
		t.Fatalf("first login with the administrator's password: %v", err)
	}
	if _, err := s.Authenticate(local1000, "op", pw, pw); err == nil || !strings.Contains(err.Error(), "used before") {
		t.Fatalf("the same password again: %v", err)
	}
	own := []byte("Own-Passw0rd-1")
	if _, err := s.Authenticate(local1000, "op", pw, own); err != nil {
		t.Fatal(err)
	}
	// From another uid than the account's: the same failure.
	if _, err := s.Authenticate(Principal{Local: true, UID: 1001}, "op", own, nil); !errors.Is(err, ErrLoginFailed) {
		t.Errorf("login from another uid: %v", err)
	}
	// A remote-only account (certificate names, no uids) cannot be
	// logged in as locally with its password alone.
	if err := s.Add(Account{Name: "fleetadmin", Roles: []Role{Administrator}, CertNames: []string{"fleetadmin"}}, nil); err != nil {
		t.Fatal(err)
	}
	remote := Principal{CertName: "fleetadmin", CertFP: "ab"}
	if err := s.ChangePassword(remote, "fleetadmin", nil, []byte("Fleet-Passw0rd-9")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Authenticate(local1000, "fleetadmin", []byte("Fleet-Passw0rd-9"), nil); !errors.Is(err, ErrLoginFailed) {
		t.Errorf("a local login as a remote-only account: %v", err)
	}
	if _, err := s.Authenticate(remote, "fleetadmin", []byte("Fleet-Passw0rd-9"), nil); err != nil {
		t.Errorf("the remote login: %v", err)
	}
	// History: the last 6 passwords (the current one included) are
	// refused.
	prev := own
	for i := 2; i <= 7; i++ {
		next := []byte("Own-Passw0rd-" + string(rune('0'+i)))
		if err := s.ChangePassword(local1000, "op", prev, next); err != nil {
			t.Fatal(err)
		}
		prev = next
	}
	if err := s.ChangePassword(local1000, "op", prev, []byte("Own-Passw0rd-3")); err == nil {
		t.Error("a password from the last 6 was accepted")
	}
	if err := s.ChangePassword(local1000, "op", prev, own); err != nil {
		t.Errorf("a password 6 changes old was refused: %v", err)
	}
	cur := own
	// Lockout.
	var msgs []string
	for i := 0; i < 5; i++ {
		_, err := s.Authenticate(local1000, "op", []byte("Wrong-Guess-123"), nil)
		var le *LoginError
		if !errors.As(err, &le) || !errors.Is(err, ErrLoginFailed) {
			t.Fatalf("guess %d: %v", i, err)
		}
		msgs = append(msgs, err.Error())
		if i == 4 && !strings.Contains(le.Detail, "locked") {
			t.Errorf("5th failure detail %q does not say locked", le.Detail)
		}
	}
	_, errRight := s.Authenticate(local1000, "op", cur, nil)
	_, errUnknown := s.Authenticate(local1000, "nobody", cur, nil)
	if errRight == nil || errRight.Error() != msgs[0] || errUnknown.Error() != msgs[0] {
		t.Errorf("answers differ: locked+right %v, unknown %v, wrong %v", errRight, errUnknown, msgs[0])
	}
	// Survives a restart.
	s2, _ := Open(dir)
	if a, _ := s2.Get("op"); !a.Locked {
		t.Error("the lock did not survive a restart")
	}
	f := false
	if _, err := s2.Set("op", nil, nil, &f); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Authenticate(local1000, "op", cur, nil); err != nil {
		t.Errorf("after unlock: %v", err)
	}
	// Expiry by age.
	p := s2.Policy()
	p.MaxAgeDays = 30
	s2.SetPolicy(p)
	s2.now = func() time.Time { return time.Now().Add(31 * 24 * time.Hour) }
	if _, err := s2.Authenticate(local1000, "op", cur, nil); !errors.Is(err, ErrPasswordExpired) {
		t.Errorf("a 31-day-old password under max_age_days 30: %v", err)
	}
	// Root is never locked by failures (only its uid can try).
	root := Principal{Local: true, UID: 0}
	if err := s2.ChangePassword(root, "root", nil, []byte("Adm1n-Passw0rd!")); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 6; i++ {
		s2.Authenticate(root, "root", []byte("nope"), nil)
	}
	if _, err := s2.Authenticate(root, "root", []byte("Adm1n-Passw0rd!"), nil); err != nil {
		t.Errorf("root after failures: %v", err)
	}
}

// TestSessions: a token works only from the principal that logged in;
// idleness locks it and cancels its context (streams end); unlock gives
// a fresh context; ending cancels.
func TestSessions(t *testing.T) {
	now := time.Now()
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	ss := NewSessions(func() time.Duration { return time.Minute })
	ss.now = clock
	tok, s, _ := ss.Open("op", local1000)
	if _, _, err := ss.Use(tok, Principal{Local: true, UID: 1001}); !errors.Is(err, ErrNoSession) {
		t.Errorf("token from another uid: %v", err)
	}
	if _, _, err := ss.Use(tok+"x", local1000); !errors.Is(err, ErrNoSession) {
		t.Errorf("forged token: %v", err)
	}
	_, ctx, err := ss.Use(tok, local1000)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	now = now.Add(2 * time.Minute)
	mu.Unlock()
	if _, _, err := ss.Use(tok, local1000); !errors.Is(err, ErrSessionLocked) {
		t.Errorf("after 2 idle minutes: %v", err)
	}
	if ctx.Err() == nil {
		t.Error("locking did not cancel the session's calls")
	}
	if _, ok := ss.Unlock(tok, local1000, "other"); ok {
		t.Error("another account unlocked the session")
	}
	if _, ok := ss.Unlock(tok, local1000, "op"); !ok {
		t.Fatal("unlock failed")
	}
	_, ctx, err = ss.Use(tok, local1000)
	if err != nil || ctx.Err() != nil {
		t.Fatalf("after unlock: %v", err)
	}
	ss.Lock(s.ID, "locked by its owner")
	if _, _, err := ss.Use(tok, local1000); !errors.Is(err, ErrSessionLocked) {
		t.Errorf("after self-lock: %v", err)
	}
	ss.Unlock(tok, local1000, "op")
	_, ctx, _ = ss.Use(tok, local1000)
	if _, ok := ss.End(s.ID); !ok || ctx.Err() == nil {
		t.Error("ending did not cancel")
	}
	if _, _, err := ss.Use(tok, local1000); !errors.Is(err, ErrNoSession) {
		t.Errorf("after end: %v", err)
	}
}

// TestSessionsConcurrent: logins, calls, locks and ends at once (under
// -race).
func TestSessionsConcurrent(t *testing.T) {
	ss := NewSessions(func() time.Duration { return time.Hour })
	ctx, cancel := context.WithCancel(context.Background())
	go ss.Run(ctx, time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			p := Principal{Local: true, UID: 1000 + i%4}
			tok, s, _ := ss.Open("a", p)
			for j := 0; j < 50; j++ {
				ss.Use(tok, p)
				ss.Touch(s.ID)
				ss.List("")
			}
			if i%2 == 0 {
				ss.End(s.ID)
			} else {
				ss.Lock(s.ID, "self")
			}
		}(i)
	}
	wg.Wait()
	if n := ss.EndAccount("a"); n != 8 {
		t.Errorf("%d sessions left to end, want 8", n)
	}
	for i := 0; i < MaxPerAccount; i++ {
		if _, _, err := ss.Open("b", local1000); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := ss.Open("b", local1000); !errors.Is(err, ErrTooManySessions) {
		t.Errorf("session %d of one account: %v", MaxPerAccount+1, err)
	}
}

// TestDecoyHasTheParameters: the decoy verified for unknown accounts has
// the parameters of real hashes, so both cost the same (CR 1.10), and it
// parses (a decoy that fails early would answer faster).
func TestDecoyHasTheParameters(t *testing.T) {
	real := hashPassword([]byte("x"))
	if strings.Join(strings.Split(decoy, "$")[:4], "$") != strings.Join(strings.Split(real, "$")[:4], "$") {
		t.Errorf("decoy %s and a real hash %s differ in parameters", decoy, real)
	}
	if verifyPassword(decoy, []byte("")) {
		t.Error("the decoy verifies the empty password")
	}
}

// TestRestoreAccounts: accounts exported from one device come back on
// another with their password hashes (the same password logs in); an
// account that exists there, or whose uid another account holds, is
// skipped and unchanged; a locked account comes back unlocked with no
// failures; built-in accounts and the policy are not touched.
func TestRestoreAccounts(t *testing.T) {
	a, _ := Open(t.TempDir())
	own := []byte("Own-Passw0rd-1")
	a.Add(Account{Name: "op", Roles: []Role{User}, LocalUIDs: []int{1000}}, []byte("Initial-Passw0rd"))
	if _, err := a.Authenticate(local1000, "op", []byte("Initial-Passw0rd"), own); err != nil {
		t.Fatal(err)
	}
	a.Add(Account{Name: "bob", Roles: []Role{Auditor}}, nil)
	a.Add(Account{Name: "eve", Roles: []Role{User}, LocalUIDs: []int{2000}}, nil)
	locked := true
	a.Set("bob", nil, nil, &locked)
	exported := a.Export()

	dir := t.TempDir()
	b, _ := Open(dir)
	b.Add(Account{Name: "mallory", Roles: []Role{Administrator}, LocalUIDs: []int{2000}}, nil)
	pol := DefaultPolicy()
	pol.MinLength = 20
	if err := b.SetPolicy(pol); err != nil {
		t.Fatal(err)
	}
	added, skipped, err := b.Restore(exported)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(added, ",") != "bob,op" || !strings.Contains(skipped["eve"], "uid 2000 is mapped to account mallory") {
		t.Errorf("added %v, skipped %v", added, skipped)
	}
	if _, err := b.Authenticate(local1000, "op", own, nil); err != nil {
		t.Errorf("the restored account with its password: %v", err)
	}
	if acc, _ := b.Get("bob"); acc.Locked || acc.Failures != 0 {
		t.Errorf("bob restored locked: %+v", acc)
	}
	if acc, _ := b.Get("mallory"); !slices.Contains(acc.LocalUIDs, 2000) {
		t.Error("a skipped account changed the one that holds its uid")
	}
	if b.Policy().MinLength != 20 {
		t.Error("a restore changed the policy")
	}
	// Again: nothing to add, nothing written.
	if added, _, err := b.Restore(exported); err != nil || len(added) != 0 {
		t.Errorf("a second restore: %v %v", added, err)
	}
	if _, _, err := b.Restore([]byte("not json")); err == nil {
		t.Error("a malformed accounts file restored")
	}
}
