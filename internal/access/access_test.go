package access

import (
	"strings"
	"testing"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
)

// TestEveryRPCHasARule: a method of the generated service without an
// entry in the table fails here (and is refused to everyone at run time).
func TestEveryRPCHasARule(t *testing.T) {
	methods := cmlv1.File_api_cml_v1_cml_proto.Services().ByName("Control").Methods()
	for i := 0; i < methods.Len(); i++ {
		if _, ok := Table[string(methods.Get(i).Name())]; !ok {
			t.Errorf("RPC %s has no authorization rule", methods.Get(i).Name())
		}
	}
}

// TestRolesCallEveryRPC: each role calls every RPC, on its own container
// and on another's: allowed or refused as the table says, and the rights
// are what the roles promise (auditors change nothing; administrators do
// not read the trail; users only touch their containers).
func TestRolesCallEveryRPC(t *testing.T) {
	admin := &Account{Name: "ad", Roles: []Role{Administrator}}
	aud := &Account{Name: "au", Roles: []Role{Auditor}}
	usr := &Account{Name: "us", Roles: []Role{User}, Containers: []string{"mine"}}
	locked := &Account{Name: "lk", Roles: []Role{Administrator}, Locked: true}
	changes := map[string]bool{}
	for m, rule := range Table {
		if rule.Any || rule.Public {
			continue // whoami, login, one's own password and sessions
		}
		if !strings.HasPrefix(m, "List") && !strings.HasSuffix(m, "List") && !strings.HasSuffix(m, "Info") && m != "State" && m != "Config" &&
			m != "Events" && m != "Network" && m != "Logs" && m != "Attest" && m != "Whoami" && m != "PolicyGet" && !strings.HasPrefix(m, "Audit") {
			changes[m] = true
		}
	}
	for m := range Table {
		if changes[m] && Allowed(aud, m, "mine") == nil {
			t.Errorf("an auditor may call %s, which changes something", m)
		}
		if strings.HasPrefix(m, "Audit") && Allowed(admin, m, "") == nil {
			t.Errorf("an administrator may read the trail (%s)", m)
		}
		if Allowed(usr, m, "mine") == nil && Allowed(usr, m, "theirs") == nil && Table[m].Scoped {
			t.Errorf("a user may %s another's container", m)
		}
		if Table[m].Public {
			continue
		}
		if Allowed(locked, m, "") == nil {
			t.Errorf("a locked account may call %s", m)
		}
		if Allowed(nil, m, "") == nil {
			t.Errorf("a caller without an account may call %s", m)
		}
	}
	for _, c := range []struct {
		a       *Account
		m, ctr  string
		allowed bool
	}{
		{admin, "Create", "", true}, {admin, "Start", "theirs", true}, {admin, "AuditShow", "", false},
		{aud, "AuditShow", "", true}, {aud, "Create", "", false}, {aud, "State", "theirs", true}, {aud, "Exec", "mine", false},
		{usr, "Start", "mine", true}, {usr, "Exec", "mine", true}, {usr, "Start", "theirs", false}, {usr, "Create", "", false},
		{usr, "AuditShow", "", false}, {usr, "Whoami", "", true}, {usr, "UserAdd", "", false},
	} {
		if got := Allowed(c.a, c.m, c.ctr) == nil; got != c.allowed {
			t.Errorf("%s calls %s on %q: allowed %t, want %t", c.a.Name, c.m, c.ctr, got, c.allowed)
		}
	}
}

func TestStore(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if a, ok := s.Local(0); !ok || a.Name != "root" || !a.Has(Administrator) {
		t.Fatalf("root is not the built-in administrator: %+v", a)
	}
	if err := s.Add(Account{Name: "op", Roles: []Role{User}, LocalUIDs: []int{1000}, Containers: []string{"c"}}, nil); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Account{{Name: "op", Roles: []Role{User}}, {Name: "x y", Roles: []Role{User}}, {Name: "n", Roles: []Role{"god"}}, {Name: "m"}, {Name: "dup", Roles: []Role{User}, LocalUIDs: []int{1000}}} {
		if err := s.Add(bad, nil); err == nil {
			t.Errorf("added %+v", bad)
		}
	}
	if err := s.Remove("root"); err == nil {
		t.Error("removed the built-in root")
	}
	tr := true
	if _, err := s.Set("root", nil, nil, &tr); err == nil {
		t.Error("locked root")
	}
	s2, _ := Open(dir)
	if a, ok := s2.Local(1000); !ok || a.Name != "op" {
		t.Errorf("accounts not persisted: %+v", a)
	}
	if _, ok := s2.Local(4242); ok {
		t.Error("an unmapped uid has an account")
	}
}

// TestStoreConcurrent: accounts change while calls are decided (run under
// -race): every add lands once, lookups never see half an account.
func TestStoreConcurrent(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 200; i++ {
			s.Local(0)
			s.ByCert("c5")
			s.List()
		}
	}()
	errs := make(chan error, 20)
	for i := 0; i < 20; i++ {
		go func(i int) {
			name := "a" + string(rune('a'+i))
			err := s.Add(Account{Name: name, Roles: []Role{User}, LocalUIDs: []int{2000 + i}, CertNames: []string{name}}, nil)
			if err == nil {
				tr := true
				_, err = s.Set(name, nil, []string{"c"}, &tr)
			}
			errs <- err
		}(i)
	}
	for i := 0; i < 20; i++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	<-done
	if n := len(s.List()); n != 22 {
		t.Errorf("%d accounts, want 22", n)
	}
}
