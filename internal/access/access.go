// Package access is who may do what through cmld's API (CR 1.1, CR 2.1,
// FDP_ACC/ACF, FMT_SMR.1): accounts with roles, the mapping of local
// callers to accounts, and one authorization table with an entry for every
// RPC, enforced at the API edge for unary and stream calls alike.
package access

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/config"
)

// Role is a set of rights.
type Role string

// The roles: administrators manage everything but read the audit trail
// (unless also auditors); auditors read and verify the trail and read
// state, and change nothing; users operate only the containers assigned
// to them.
const (
	Administrator Role = "administrator"
	Auditor       Role = "auditor"
	User          Role = "user"
)

// Roles lists the roles in a stable order.
var Roles = []Role{Administrator, Auditor, User}

// Rule is who may call one RPC. Scoped rules let a user call it only on a
// container assigned to it (the request names the container).
type Rule struct {
	Roles  []Role
	Scoped bool // users: only their containers
	Any    bool // every caller with an account (whoami; its own password and sessions)
	// Public: callable before authentication (login authenticates
	// itself).
	Public bool
}

func r(roles ...Role) Rule   { return Rule{Roles: roles} }
func own(roles ...Role) Rule { return Rule{Roles: append(roles, User), Scoped: true} }

// Table is the authorization of every RPC of the control API. A test
// fails when the generated service has a method without an entry.
var Table = map[string]Rule{
	"List": r(Administrator, Auditor, User), "State": own(Administrator, Auditor), "Config": own(Administrator, Auditor),
	"Events": r(Administrator, Auditor, User), "Network": own(Administrator, Auditor),
	"Create": r(Administrator), "Remove": r(Administrator), "UpdateConfig": r(Administrator), "Wipe": r(Administrator),
	"Start": own(Administrator), "Stop": own(Administrator), "Kill": own(Administrator),
	"Freeze": own(Administrator), "Unfreeze": own(Administrator), "Exec": own(Administrator), "Logs": own(Administrator, Auditor),
	"ChangePin": own(Administrator), "TokenReset": r(Administrator),
	"GuestOSList": r(Administrator, Auditor, User), "GuestOSInstall": r(Administrator), "GuestOSRemove": r(Administrator),
	"CAList": r(Administrator, Auditor), "CARegister": r(Administrator), "CARemove": r(Administrator),
	"CRLLoad": r(Administrator), "CRLList": r(Administrator, Auditor), "CRLRemove": r(Administrator),
	"DeviceInfo": r(Administrator, Auditor, User), "DeviceCSR": r(Administrator), "DeviceCert": r(Administrator),
	"DeviceProvisioned": r(Administrator), "DeviceWipe": r(Administrator), "Attest": r(Administrator, Auditor),
	"AuditShow": r(Auditor), "AuditVerify": r(Auditor), "AuditStatus": r(Auditor), "AuditExport": r(Auditor), "AuditArchive": r(Auditor),
	"Backup": r(Administrator), "Restore": r(Administrator),
	"Whoami":  {Any: true},
	"UserAdd": r(Administrator), "UserRemove": r(Administrator), "UserList": r(Administrator, Auditor), "UserSet": r(Administrator),
	// Every account changes its own password and sees, locks and ends
	// its own sessions; administrators also others' (the handlers scope
	// them).
	"Login": {Public: true}, "UserPasswd": {Any: true},
	"SessionList": {Any: true}, "SessionEnd": {Any: true}, "SessionLock": {Any: true},
	"PolicyGet": r(Administrator, Auditor), "PolicySet": r(Administrator),
}

// Account is one identified user of cmld (FIA_ATD.1). Accounts live in
// cmld, not in /etc/passwd.
type Account struct {
	Name       string   `json:"name"`
	Roles      []Role   `json:"roles"`
	LocalUIDs  []int    `json:"local_uids,omitempty"` // local socket callers mapped to it
	Containers []string `json:"containers,omitempty"` // names a user may operate
	// CertNames are client certificate common names that authenticate
	// as this account over the remote API.
	CertNames []string `json:"cert_names,omitempty"`
	Locked    bool     `json:"locked,omitempty"`
	// LockReason says who locked it: an administrator, or too many
	// failed logins (FIA_AFL.1).
	LockReason string `json:"lock_reason,omitempty"`
	BuiltIn    bool   `json:"built_in,omitempty"`

	// Password is the Argon2id hash (PHC string) of the account's
	// password; an account with one must log in (cmlctl login), also
	// where its uid or certificate maps to it (multi-factor).
	Password        string    `json:"password,omitempty"`
	PasswordChanged time.Time `json:"password_changed,omitzero"`
	// MustChange: set by an administrator's password, so the owner
	// chooses its own at the next login.
	MustChange bool `json:"must_change,omitempty"`
	// History holds the hashes of earlier passwords, newest first.
	History []string `json:"history,omitempty"`
	// Failures counts failed logins since the last success.
	Failures int `json:"failures,omitempty"`
}

// Has reports whether a has role.
func (a *Account) Has(role Role) bool { return slices.Contains(a.Roles, role) }

// HasPassword reports whether the account must log in with a password.
func (a *Account) HasPassword() bool { return a.Password != "" }

func (a *Account) clone() *Account {
	c := *a
	c.Roles = slices.Clone(a.Roles)
	c.LocalUIDs = slices.Clone(a.LocalUIDs)
	c.Containers = slices.Clone(a.Containers)
	c.CertNames = slices.Clone(a.CertNames)
	c.History = slices.Clone(a.History)
	return &c
}

// Public is the account without its password hashes, for messages and
// logs.
func (a *Account) Public() Account {
	c := *a.clone()
	c.Password, c.History = "", nil
	return c
}

// AuditGroup's members are the built-in auditor on the local socket.
const AuditGroup = "cml-audit"

// snapshot is one immutable version of the accounts and the policy:
// lookups read the current one without a lock; changes copy it, write it
// to disk and publish the copy (so no caller waits for a disk write to be
// identified).
type snapshot struct {
	policy Policy
	accs   map[string]*Account
}

func (s *snapshot) clone() *snapshot {
	c := &snapshot{policy: s.policy, accs: make(map[string]*Account, len(s.accs))}
	for n, a := range s.accs {
		c.accs[n] = a.clone()
	}
	return c
}

// Store keeps the accounts and the password policy in
// <state>/accounts.json. Root (uid 0) is the built-in administrator (and
// auditor) "root", members of group cml-audit the built-in auditor
// "audit", so existing scripts keep working.
type Store struct {
	path string
	wmu  sync.Mutex // serializes changes, held across their write
	cur  atomic.Pointer[snapshot]
	// LimitedRootTrust (device setting access.limited_root_trust): local
	// root is not authenticated by its uid alone.
	LimitedRootTrust bool
	// hashing bounds concurrent Argon2id computations (64 MiB each).
	hashing chan struct{}
	now     func() time.Time
}

type storeFile struct {
	Policy   *Policy    `json:"policy,omitempty"`
	Accounts []*Account `json:"accounts"`
}

// Open loads the accounts.
func Open(dir string) (*Store, error) {
	s := &Store{path: filepath.Join(dir, "accounts.json"), hashing: make(chan struct{}, 2), now: time.Now}
	snap := &snapshot{policy: DefaultPolicy(), accs: map[string]*Account{}}
	b, err := os.ReadFile(s.path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	if err == nil {
		var f storeFile
		if len(bytes.TrimSpace(b)) > 0 && bytes.TrimSpace(b)[0] == '[' {
			err = json.Unmarshal(b, &f.Accounts) // before the policy existed
		} else {
			err = json.Unmarshal(b, &f)
		}
		if err != nil {
			return nil, fmt.Errorf("accounts: %w", err)
		}
		if f.Policy != nil {
			if err := f.Policy.Valid(); err != nil {
				return nil, fmt.Errorf("accounts: policy: %w", err)
			}
			snap.policy = *f.Policy
		}
		for _, a := range f.Accounts {
			snap.accs[a.Name] = a
		}
	}
	if snap.accs["root"] == nil {
		// Local root administers and audits, as before accounts existed
		// (existing scripts keep working); remove its auditor role to
		// separate the two.
		snap.accs["root"] = &Account{Name: "root", Roles: []Role{Administrator, Auditor}, LocalUIDs: []int{0}, BuiltIn: true}
	}
	if snap.accs["audit"] == nil {
		snap.accs["audit"] = &Account{Name: "audit", Roles: []Role{Auditor}, BuiltIn: true}
	}
	s.cur.Store(snap)
	return s, nil
}

// update applies fn to a copy of the accounts, writes the copy and
// publishes it; an error from fn or the write changes nothing.
func (s *Store) update(fn func(*snapshot) error) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	next := s.cur.Load().clone()
	if err := fn(next); err != nil {
		return err
	}
	if err := atomicfile.Write(s.path, next.encode(), 0o600); err != nil {
		return fmt.Errorf("accounts: %w", err)
	}
	s.cur.Store(next)
	return nil
}

// encode is the accounts file of snap.
func (snap *snapshot) encode() []byte {
	f := storeFile{Policy: &snap.policy}
	for _, a := range snap.accs {
		f.Accounts = append(f.Accounts, a)
	}
	sort.Slice(f.Accounts, func(i, j int) bool { return f.Accounts[i].Name < f.Accounts[j].Name })
	b, _ := json.MarshalIndent(f, "", "  ")
	return b
}

// Export returns the accounts and the policy as the accounts file holds
// them (password hashes included), for a backup.
func (s *Store) Export() []byte { return s.cur.Load().encode() }

// Restore adds the accounts of an exported file (Export) that this device
// does not have, with their roles, containers, mappings and password
// hashes (CR 7.4: the same credentials work on a replacement device).
// Failure counts and locks start afresh. An account whose name exists
// here, or whose uid or certificate name another account here holds, is
// skipped with the reason; built-in accounts and the policy are not
// touched. Nothing is written when nothing is added.
func (s *Store) Restore(b []byte) (added []string, skipped map[string]string, err error) {
	var f storeFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, nil, fmt.Errorf("accounts: %w", err)
	}
	skipped = map[string]string{}
	err = s.update(func(snap *snapshot) error {
		for _, a := range f.Accounts {
			if a == nil {
				continue
			}
			switch {
			case a.BuiltIn:
				continue
			case !config.ValidName(a.Name) || validRoles(a.Roles) != nil:
				skipped[a.Name] = "not a valid account"
				continue
			case snap.accs[a.Name] != nil:
				skipped[a.Name] = "exists here"
				continue
			}
			if clash := snap.mapped(a); clash != "" {
				skipped[a.Name] = clash
				continue
			}
			a.Locked, a.LockReason, a.Failures = false, "", 0
			snap.accs[a.Name] = a.clone()
			added = append(added, a.Name)
		}
		if len(added) == 0 {
			return errNothing
		}
		return nil
	})
	if errors.Is(err, errNothing) {
		err = nil
	}
	sort.Strings(added)
	return added, skipped, err
}

var errNothing = errors.New("nothing to change")

// mapped names the account here that already holds one of a's local
// uids or certificate names ("" if none).
func (snap *snapshot) mapped(a *Account) string {
	for _, o := range snap.accs {
		for _, u := range a.LocalUIDs {
			if slices.Contains(o.LocalUIDs, u) {
				return fmt.Sprintf("local uid %d is mapped to account %s already", u, o.Name)
			}
		}
		for _, n := range a.CertNames {
			if slices.Contains(o.CertNames, n) {
				return fmt.Sprintf("certificate name %q is mapped to account %s already", n, o.Name)
			}
		}
	}
	return ""
}

// Get returns a copy of one account.
func (s *Store) Get(name string) (*Account, bool) {
	a := s.cur.Load().accs[name]
	if a == nil {
		return nil, false
	}
	return a.clone(), true
}

// Local maps a local socket caller to its account: an account listing its
// uid, else the built-in auditor for members of cml-audit.
func (s *Store) Local(uid int) (*Account, bool) {
	snap := s.cur.Load()
	for _, a := range snap.accs {
		if slices.Contains(a.LocalUIDs, uid) {
			return a.clone(), true
		}
	}
	if g, err := user.LookupGroup(AuditGroup); err == nil {
		if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
			if ids, err := u.GroupIds(); err == nil && slices.Contains(ids, g.Gid) {
				return snap.accs["audit"].clone(), true
			}
		}
	}
	return nil, false
}

// ByCert maps a remote caller's client certificate (its common name,
// already verified against the owner CAs) to its account.
func (s *Store) ByCert(cn string) (*Account, bool) {
	for _, a := range s.cur.Load().accs {
		if cn != "" && slices.Contains(a.CertNames, cn) {
			return a.clone(), true
		}
	}
	return nil, false
}

// List returns copies of every account, by name.
func (s *Store) List() []Account {
	var out []Account
	for _, a := range s.cur.Load().accs {
		out = append(out, *a.clone())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func validRoles(roles []Role) error {
	if len(roles) == 0 {
		return fmt.Errorf("an account needs at least one role (administrator, auditor, user)")
	}
	for _, r := range roles {
		if !slices.Contains(Roles, r) {
			return fmt.Errorf("%q is not a role (administrator, auditor, user)", r)
		}
	}
	return nil
}

// Add creates an account, with an initial password when password is not
// empty (set by an administrator: the owner must change it at its first
// login).
func (s *Store) Add(a Account, password []byte) error {
	if !config.ValidName(a.Name) {
		return fmt.Errorf("account name %q is not a safe identifier", a.Name)
	}
	if err := validRoles(a.Roles); err != nil {
		return err
	}
	a.BuiltIn, a.Locked, a.LockReason, a.Failures, a.History = false, false, "", 0, nil
	a.Password, a.MustChange = "", false
	if len(password) > 0 {
		if err := s.Policy().Check(a.Name, password); err != nil {
			return err
		}
		a.Password, a.PasswordChanged, a.MustChange = s.hash(password), s.now(), true
	}
	return s.update(func(snap *snapshot) error {
		if snap.accs[a.Name] != nil {
			return fmt.Errorf("account %s exists already", a.Name)
		}
		if clash := snap.mapped(&a); clash != "" {
			return errors.New(clash)
		}
		snap.accs[a.Name] = &a
		return nil
	})
}

// Remove deletes an account; built-in ones stay.
func (s *Store) Remove(name string) error {
	return s.update(func(snap *snapshot) error {
		a := snap.accs[name]
		switch {
		case a == nil:
			return fmt.Errorf("account %s does not exist", name)
		case a.BuiltIn:
			return fmt.Errorf("account %s is built in and cannot be removed", name)
		}
		delete(snap.accs, name)
		return nil
	})
}

// Set changes an account's roles, containers or lock (nil: unchanged).
// Unlocking also clears the failed-login count.
func (s *Store) Set(name string, roles []Role, containers []string, locked *bool) (Account, error) {
	if roles != nil {
		if err := validRoles(roles); err != nil {
			return Account{}, err
		}
	}
	var out Account
	err := s.update(func(snap *snapshot) error {
		a := snap.accs[name]
		if a == nil {
			return fmt.Errorf("account %s does not exist", name)
		}
		if roles != nil {
			if a.Name == "root" && !slices.Contains(roles, Administrator) {
				return fmt.Errorf("the built-in root account keeps the administrator role")
			}
			a.Roles = roles
		}
		if containers != nil {
			a.Containers = containers
		}
		if locked != nil {
			if a.Name == "root" && *locked {
				return fmt.Errorf("the built-in root account cannot be locked")
			}
			a.Locked, a.LockReason = *locked, ""
			if *locked {
				a.LockReason = "locked by an administrator"
			} else {
				a.Failures = 0
			}
		}
		out = *a.clone()
		return nil
	})
	return out, err
}

// Allowed decides a call: the account's roles against the method's rule,
// and for a scoped call by a user, whether container (the request's) is
// one of its own. It returns why not, in one line.
func Allowed(a *Account, method, container string) error {
	rule, ok := Table[method]
	if !ok {
		return fmt.Errorf("%s is not allowed to anyone (no rule)", method)
	}
	if rule.Public {
		return nil
	}
	if a == nil {
		return fmt.Errorf("the caller has no account")
	}
	if a.Locked {
		return fmt.Errorf("account %s is locked", a.Name)
	}
	if rule.Any {
		return nil
	}
	for _, role := range rule.Roles {
		if !a.Has(role) {
			continue
		}
		if role == User && rule.Scoped && !slices.Contains(a.Containers, container) {
			continue
		}
		return nil
	}
	if rule.Scoped && a.Has(User) {
		return fmt.Errorf("account %s may not %s container %q (not assigned to it)", a.Name, method, container)
	}
	return fmt.Errorf("account %s (%v) may not call %s", a.Name, a.Roles, method)
}
