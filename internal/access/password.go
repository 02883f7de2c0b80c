package access

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/crypto/argon2"
)

// Policy is the authentication policy an administrator sets (FMT_MOF.1,
// CR 1.7, FIA_AFL.1, FTA_SSL.1).
type Policy struct {
	MinLength  int `json:"min_length"`  // characters
	MinClasses int `json:"min_classes"` // of lower, upper, digit, other
	History    int `json:"history"`     // passwords not to reuse, the current one included
	MaxAgeDays int `json:"max_age_days"`
	// MaxFailures locks an account after that many failed logins in a
	// row, until an administrator unlocks it.
	MaxFailures int `json:"max_failures"`
	// IdleTimeoutSeconds locks a session without activity.
	IdleTimeoutSeconds int `json:"idle_timeout_seconds"`
	// RemoteMFA: remote callers need a password besides their
	// certificate.
	RemoteMFA bool `json:"remote_mfa"`
}

// DefaultPolicy: 12 characters of 3 classes, the last 6 not reused, no
// expiry, locked after 5 failures, sessions lock after 15 minutes idle.
func DefaultPolicy() Policy {
	return Policy{MinLength: 12, MinClasses: 3, History: 6, MaxFailures: 5, IdleTimeoutSeconds: 900}
}

// Valid checks the policy's bounds (one line naming the field).
func (p Policy) Valid() error {
	switch {
	case p.MinLength < 8 || p.MinLength > 128:
		return fmt.Errorf("min_length %d is out of range (8 to 128)", p.MinLength)
	case p.MinClasses < 1 || p.MinClasses > 4:
		return fmt.Errorf("min_classes %d is out of range (1 to 4: lower, upper, digit, other)", p.MinClasses)
	case p.History < 6 || p.History > 24:
		return fmt.Errorf("history %d is out of range (6 to 24)", p.History)
	case p.MaxAgeDays < 0 || p.MaxAgeDays > 3650:
		return fmt.Errorf("max_age_days %d is out of range (0 = never, to 3650)", p.MaxAgeDays)
	case p.MaxFailures < 1 || p.MaxFailures > 100:
		return fmt.Errorf("max_failures %d is out of range (1 to 100)", p.MaxFailures)
	case p.IdleTimeoutSeconds < 10 || p.IdleTimeoutSeconds > 86400:
		return fmt.Errorf("idle_timeout_seconds %d is out of range (10 to 86400)", p.IdleTimeoutSeconds)
	}
	return nil
}

// Policy returns the current policy.
func (s *Store) Policy() Policy { return s.cur.Load().policy }

// SetPolicy replaces the policy; it applies to passwords set from now on
// and to the next login's expiry check.
func (s *Store) SetPolicy(p Policy) error {
	if err := p.Valid(); err != nil {
		return err
	}
	return s.update(func(snap *snapshot) error { snap.policy = p; return nil })
}

// Check tests a new password against the policy's composition rules.
func (p Policy) Check(name string, pw []byte) error {
	if !utf8.Valid(pw) {
		return fmt.Errorf("the password is not valid UTF-8")
	}
	if n := utf8.RuneCount(pw); n < p.MinLength {
		return fmt.Errorf("the password is too short (%d characters, the policy wants at least %d)", n, p.MinLength)
	}
	if utf8.RuneCount(pw) > 1024 {
		return fmt.Errorf("the password is too long (at most 1024 characters)")
	}
	var lower, upper, digit, other int
	for _, r := range string(pw) {
		switch {
		case unicode.IsLower(r):
			lower = 1
		case unicode.IsUpper(r):
			upper = 1
		case unicode.IsDigit(r):
			digit = 1
		default:
			other = 1
		}
	}
	if c := lower + upper + digit + other; c < p.MinClasses {
		return fmt.Errorf("the password has %d of the character classes lower case, upper case, digit, other; the policy wants %d", c, p.MinClasses)
	}
	if len(name) >= 3 && strings.Contains(strings.ToLower(string(pw)), strings.ToLower(name)) {
		return fmt.Errorf("the password contains the account name")
	}
	return nil
}

// Argon2id parameters for passwords: RFC 9106's second recommended option
// (t=3, 64 MiB), 4 lanes, as for the soft token's PIN.
const (
	pwTime    = 3
	pwMemKiB  = 64 * 1024
	pwThreads = 4
)

// decoy is verified for logins that name no usable account, so they take
// as long as a wrong password (CR 1.10): the hash, with the parameters
// above, of 32 random bytes nobody kept. A constant, so that cmld's start
// does not pay for an Argon2id run (seconds on a slow or emulated CPU).
const decoy = "$argon2id$v=19$m=65536,t=3,p=4$xuehtimTk+kIpeCHiVvJ6Q$/H4GE/qhTKrX2eWUMIrwth+jDnTYTFmhe8xcE3JTitY"

func hashPassword(pw []byte) string {
	salt := make([]byte, 16)
	rand.Read(salt)
	h := argon2.IDKey(pw, salt, pwTime, pwMemKiB, pwThreads, 32)
	enc := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=19$m=%d,t=%d,p=%d$%s$%s", pwMemKiB, pwTime, pwThreads, enc.EncodeToString(salt), enc.EncodeToString(h))
}

// verifyPassword checks pw against a PHC-format Argon2id hash. The
// parameters are bounded, so a doctored file cannot make a login
// allocate gigabytes.
func verifyPassword(phc string, pw []byte) bool {
	f := strings.Split(phc, "$")
	if len(f) != 6 || f[1] != "argon2id" || f[2] != "v=19" {
		return false
	}
	var m, t uint32
	var p uint8
	if _, err := fmt.Sscanf(f[3], "m=%d,t=%d,p=%d", &m, &t, &p); err != nil || m > 256*1024 || m < 8*1024 || t > 10 || t < 1 || p > 16 || p < 1 {
		return false
	}
	enc := base64.RawStdEncoding
	salt, err1 := enc.DecodeString(f[4])
	want, err2 := enc.DecodeString(f[5])
	if err1 != nil || err2 != nil || len(want) != 32 {
		return false
	}
	return subtle.ConstantTimeCompare(argon2.IDKey(pw, salt, t, m, p, 32), want) == 1
}

// hash and verify run Argon2id, at most two at a time (64 MiB each): a
// burst of logins queues instead of exhausting memory (CR 7.1).
func (s *Store) hash(pw []byte) string {
	s.hashing <- struct{}{}
	defer func() { <-s.hashing }()
	return hashPassword(pw)
}

func (s *Store) verify(phc string, pw []byte) bool {
	s.hashing <- struct{}{}
	defer func() { <-s.hashing }()
	return verifyPassword(phc, pw)
}

// Principal is who is on the other end of a connection: a local uid
// (the kernel's word) or a remote client certificate (verified at the
// handshake). Sessions are bound to it.
type Principal struct {
	Local    bool
	UID      int
	CertName string // remote: the certificate's common name
	CertFP   string // remote: SHA-256 of the certificate
}

func (p Principal) String() string {
	if p.Local {
		return fmt.Sprintf("local uid %d", p.UID)
	}
	return fmt.Sprintf("certificate %s (%s…)", p.CertName, p.CertFP[:min(16, len(p.CertFP))])
}

// The login errors. ErrLoginFailed is the one answer for an unknown
// account, a wrong password, a locked account and an account that cannot
// log in from where the caller is (CR 1.10); LoginError.Detail says
// which, for the audit trail only.
var (
	ErrLoginFailed     = errors.New("unknown account, wrong password, or the account may not log in")
	ErrPasswordExpired = errors.New("the password has expired: choose a new one")
)

// LoginError is a failed login: Err is what the caller is told, Detail
// what the audit trail records.
type LoginError struct {
	Err    error
	Detail string
}

func (e *LoginError) Error() string { return e.Err.Error() }
func (e *LoginError) Unwrap() error { return e.Err }

func failed(format string, args ...any) error {
	return &LoginError{Err: ErrLoginFailed, Detail: fmt.Sprintf(format, args...)}
}

// bound reports whether an account may log in from p: a local caller
// whose uid the account lists (any uid when it lists neither uids nor
// certificates: a password-only account), a remote caller whose
// certificate maps to it. An account with certificate names and no uids
// is remote only: a local user cannot log in as it with the password
// alone, skipping the certificate.
func (a *Account) bound(p Principal) bool {
	if p.Local {
		return slices.Contains(a.LocalUIDs, p.UID) || len(a.LocalUIDs) == 0 && len(a.CertNames) == 0
	}
	return slices.Contains(a.CertNames, p.CertName)
}

// Expired reports whether the account's password must be changed before
// it may do anything.
func (s *Store) Expired(a *Account) bool {
	if a.MustChange {
		return true
	}
	p := s.Policy()
	return p.MaxAgeDays > 0 && a.HasPassword() && s.now().Sub(a.PasswordChanged) > time.Duration(p.MaxAgeDays)*24*time.Hour
}

// Authenticate checks a login: name and password from principal p. An
// expired password needs newPassword, which is checked against the
// policy and history and set.
func (s *Store) Authenticate(p Principal, name string, password, newPassword []byte) (*Account, error) {
	a, err := s.check(p, name, password)
	if err != nil {
		return nil, err
	}
	if s.Expired(a) {
		if len(newPassword) == 0 {
			return nil, &LoginError{Err: ErrPasswordExpired, Detail: fmt.Sprintf("password of %s expired", name)}
		}
		if err := s.setPassword(name, newPassword, false); err != nil {
			return nil, &LoginError{Err: err, Detail: fmt.Sprintf("new password for %s refused: %v", name, err)}
		}
		a, _ = s.Get(name)
	}
	return a, nil
}

// check verifies a password. Every path that fails runs Argon2id once, so
// an unknown account and a wrong password take the same time. A wrong
// password counts against the account; at the policy's max_failures it
// locks (except the built-in root, which only its local uid can log in
// as, so that no failure can leave the device without an administrator).
func (s *Store) check(p Principal, name string, password []byte) (*Account, error) {
	a, ok := s.Get(name)
	switch {
	case !ok:
		s.verify(decoy, password)
		return nil, failed("no account %q", name)
	case !a.HasPassword():
		s.verify(decoy, password)
		return nil, failed("account %s has no password", name)
	case !a.bound(p):
		s.verify(decoy, password)
		return nil, failed("account %s may not log in as %s", name, p)
	}
	good := s.verify(a.Password, password)
	if a.Locked {
		return nil, failed("account %s is locked (%s)", name, a.LockReason)
	}
	if !good {
		var detail string
		err := s.update(func(snap *snapshot) error {
			c := snap.accs[name]
			if c == nil {
				return nil
			}
			c.Failures++
			detail = fmt.Sprintf("wrong password for %s (%d failures in a row)", name, c.Failures)
			if c.Failures >= snap.policy.MaxFailures && c.Name != "root" {
				c.Locked, c.LockReason = true, fmt.Sprintf("%d failed logins", c.Failures)
				detail += "; account locked"
			}
			return nil
		})
		if err != nil {
			detail += fmt.Sprintf(" (not counted: %v)", err)
		}
		return nil, &LoginError{Err: ErrLoginFailed, Detail: detail}
	}
	if a.Failures > 0 {
		s.update(func(snap *snapshot) error {
			if c := snap.accs[name]; c != nil {
				c.Failures = 0
			}
			return nil
		})
	}
	return a, nil
}

// ChangePassword is an account changing its own password: the old one
// must be right (a wrong one counts as a failed login). An account
// without a password yet sets its first one (limited trust in root's
// bootstrap).
func (s *Store) ChangePassword(p Principal, name string, old, new []byte) error {
	if a, ok := s.Get(name); ok && a.HasPassword() {
		if _, err := s.check(p, name, old); err != nil {
			return err
		}
	}
	return s.setPassword(name, new, false)
}

// ResetPassword is an administrator setting another account's password:
// its owner must change it at the next login.
func (s *Store) ResetPassword(name string, new []byte) error {
	return s.setPassword(name, new, true)
}

// setPassword checks new against the policy and the account's history
// (Argon2id outside the lock) and sets it.
func (s *Store) setPassword(name string, new []byte, mustChange bool) error {
	a, ok := s.Get(name)
	if !ok {
		return fmt.Errorf("account %s does not exist", name)
	}
	pol := s.Policy()
	if err := pol.Check(name, new); err != nil {
		return err
	}
	// The history counts the current password: it and the
	// History-1 before it are refused.
	for i, h := range append([]string{a.Password}, a.History...) {
		if i >= pol.History {
			break
		}
		if h != "" && s.verify(h, new) {
			return fmt.Errorf("the password was used before (the policy keeps the last %d)", pol.History)
		}
	}
	hashed := s.hash(new)
	return s.update(func(snap *snapshot) error {
		c := snap.accs[name]
		if c == nil {
			return fmt.Errorf("account %s does not exist", name)
		}
		if c.Password != "" {
			c.History = append([]string{c.Password}, c.History...)
		}
		if len(c.History) > snap.policy.History-1 {
			c.History = c.History[:snap.policy.History-1]
		}
		c.Password, c.PasswordChanged, c.MustChange, c.Failures = hashed, s.now(), mustChange, 0
		return nil
	})
}
