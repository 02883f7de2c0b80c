package access

import (
	"os"
	"slices"
	"strings"
	"testing"
)

// cells renders a rule as the table in docs/access.md writes it, one
// cell per role (administrator, auditor, user).
func cells(r Rule) []string {
	switch {
	case r.Public:
		return []string{"before login", "before login", "before login"}
	case r.Any:
		return []string{"every account", "every account", "every account"}
	}
	var out []string
	for _, role := range Roles {
		c := "no"
		if slices.Contains(r.Roles, role) {
			c = "yes"
			if role == User && r.Scoped {
				c = "own"
			}
		}
		out = append(out, c)
	}
	return out
}

// TestDocsTableMatchesCode: the rights table in docs/access.md says what
// access.Table does, for every RPC, and names each RPC once.
func TestDocsTableMatchesCode(t *testing.T) {
	b, err := os.ReadFile("../../docs/access.md")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	in := false
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "| RPCs | administrator | auditor | user |") {
			in = true
			continue
		}
		if !in || strings.HasPrefix(line, "|---") {
			continue
		}
		if !strings.HasPrefix(line, "|") {
			if len(seen) > 0 {
				break
			}
			continue
		}
		f := strings.Split(strings.Trim(line, "|"), "|")
		for i := range f {
			f[i] = strings.TrimSpace(f[i])
		}
		if len(f) != 4 {
			t.Fatalf("docs/access.md: row %q has %d cells, want 4", line, len(f))
		}
		for _, m := range strings.Split(f[0], ",") {
			m = strings.TrimSpace(m)
			rule, ok := Table[m]
			if !ok {
				t.Errorf("docs/access.md names %s, which has no rule", m)
				continue
			}
			if seen[m] {
				t.Errorf("docs/access.md names %s twice", m)
			}
			seen[m] = true
			if want := cells(rule); !slices.Equal(want, f[1:]) {
				t.Errorf("docs/access.md: %s is %v, the code says %v", m, f[1:], want)
			}
		}
	}
	for m := range Table {
		if !seen[m] {
			t.Errorf("docs/access.md does not list %s", m)
		}
	}
}
