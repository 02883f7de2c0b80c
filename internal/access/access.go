// Package access is who may do what through cmld's API (CR 1.1, CR 2.1,
// FDP_ACC/ACF, FMT_SMR.1): accounts with roles, the mapping of local
// callers to accounts, and one authorization table with an entry for every
// RPC, enforced at the API edge for unary and stream calls alike.
package access

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"

	"encoding/json"

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
	Any    bool // every caller with an account (whoami)
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
	"AuditShow": r(Auditor), "AuditVerify": r(Auditor), "AuditStatus": r(Auditor),
	"Whoami":  {Any: true},
	"UserAdd": r(Administrator), "UserRemove": r(Administrator), "UserList": r(Administrator, Auditor), "UserSet": r(Administrator),
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
	BuiltIn   bool     `json:"built_in,omitempty"`
}

// Has reports whether a has role.
func (a *Account) Has(role Role) bool { return slices.Contains(a.Roles, role) }

// AuditGroup's members are the built-in auditor on the local socket.
const AuditGroup = "cml-audit"

// Store keeps the accounts in <state>/accounts.json. Root (uid 0) is the
// built-in administrator (and auditor) "root", members of group cml-audit the built-in
// auditor "audit", so existing scripts keep working.
type Store struct {
	path string
	mu   sync.Mutex
	accs map[string]*Account
}

// Open loads the accounts.
func Open(dir string) (*Store, error) {
	s := &Store{path: filepath.Join(dir, "accounts.json"), accs: map[string]*Account{}}
	b, err := os.ReadFile(s.path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	if err == nil {
		var list []*Account
		if err := json.Unmarshal(b, &list); err != nil {
			return nil, fmt.Errorf("accounts: %w", err)
		}
		for _, a := range list {
			s.accs[a.Name] = a
		}
	}
	if s.accs["root"] == nil {
		// Local root administers and audits, as before accounts existed
		// (existing scripts keep working); remove its auditor role to
		// separate the two.
		s.accs["root"] = &Account{Name: "root", Roles: []Role{Administrator, Auditor}, LocalUIDs: []int{0}, BuiltIn: true}
	}
	if s.accs["audit"] == nil {
		s.accs["audit"] = &Account{Name: "audit", Roles: []Role{Auditor}, BuiltIn: true}
	}
	return s, nil
}

// save writes the accounts; the caller holds mu.
func (s *Store) saveLocked() error {
	var list []*Account
	for _, a := range s.accs {
		list = append(list, a)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
	b, _ := json.MarshalIndent(list, "", "  ")
	return atomicfile.Write(s.path, b, 0o600)
}

// Local maps a local socket caller to its account: an account listing its
// uid, else the built-in auditor for members of cml-audit.
func (s *Store) Local(uid int) (*Account, bool) {
	s.mu.Lock()
	for _, a := range s.accs {
		if slices.Contains(a.LocalUIDs, uid) {
			c := *a
			s.mu.Unlock()
			return &c, true
		}
	}
	aud := *s.accs["audit"]
	s.mu.Unlock()
	if g, err := user.LookupGroup(AuditGroup); err == nil {
		if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
			if ids, err := u.GroupIds(); err == nil && slices.Contains(ids, g.Gid) {
				return &aud, true
			}
		}
	}
	return nil, false
}

// ByCert maps a remote caller's client certificate (its common name,
// already verified against the owner CAs) to its account.
func (s *Store) ByCert(cn string) (*Account, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, a := range s.accs {
		if cn != "" && slices.Contains(a.CertNames, cn) {
			c := *a
			return &c, true
		}
	}
	return nil, false
}

// List returns copies of every account, by name.
func (s *Store) List() []Account {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Account
	for _, a := range s.accs {
		out = append(out, *a)
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

// Add creates an account.
func (s *Store) Add(a Account) error {
	if !config.ValidName(a.Name) {
		return fmt.Errorf("account name %q is not a safe identifier", a.Name)
	}
	if err := validRoles(a.Roles); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.accs[a.Name] != nil {
		return fmt.Errorf("account %s exists already", a.Name)
	}
	for _, o := range s.accs {
		for _, u := range a.LocalUIDs {
			if slices.Contains(o.LocalUIDs, u) {
				return fmt.Errorf("local uid %d is mapped to account %s already", u, o.Name)
			}
		}
		for _, n := range a.CertNames {
			if slices.Contains(o.CertNames, n) {
				return fmt.Errorf("certificate name %q is mapped to account %s already", n, o.Name)
			}
		}
	}
	a.BuiltIn = false
	s.accs[a.Name] = &a
	if err := s.saveLocked(); err != nil {
		delete(s.accs, a.Name)
		return err
	}
	return nil
}

// Remove deletes an account; built-in ones stay.
func (s *Store) Remove(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.accs[name]
	switch {
	case a == nil:
		return fmt.Errorf("account %s does not exist", name)
	case a.BuiltIn:
		return fmt.Errorf("account %s is built in and cannot be removed", name)
	}
	delete(s.accs, name)
	if err := s.saveLocked(); err != nil {
		s.accs[name] = a
		return err
	}
	return nil
}

// Set changes an account's roles, containers or lock (nil: unchanged).
func (s *Store) Set(name string, roles []Role, containers []string, locked *bool) (Account, error) {
	if roles != nil {
		if err := validRoles(roles); err != nil {
			return Account{}, err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.accs[name]
	if a == nil {
		return Account{}, fmt.Errorf("account %s does not exist", name)
	}
	old := *a
	if roles != nil {
		if a.Name == "root" && !slices.Contains(roles, Administrator) {
			return old, fmt.Errorf("the built-in root account keeps the administrator role")
		}
		a.Roles = roles
	}
	if containers != nil {
		a.Containers = containers
	}
	if locked != nil {
		if a.Name == "root" && *locked {
			return old, fmt.Errorf("the built-in root account cannot be locked")
		}
		a.Locked = *locked
	}
	if err := s.saveLocked(); err != nil {
		*a = old
		return old, err
	}
	return *a, nil
}

// Allowed decides a call: the account's roles against the method's rule,
// and for a scoped call by a user, whether container (the request's) is
// one of its own. It returns why not, in one line.
func Allowed(a *Account, method, container string) error {
	rule, ok := Table[method]
	if !ok {
		return fmt.Errorf("%s is not allowed to anyone (no rule)", method)
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
