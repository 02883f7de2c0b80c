package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// secretFiles writes each secret to a file of its own, readable only by
// uid (0600), in a directory of uid's, and returns the paths by secret.
func secretFiles(t *testing.T, dir string, uid int, secrets ...string) map[string]string {
	t.Helper()
	os.MkdirAll(dir, 0o700)
	os.Chown(dir, uid, 65534)
	out := map[string]string{}
	for i, s := range secrets {
		p := filepath.Join(dir, "secret"+string(rune('a'+i)))
		os.WriteFile(p, []byte(s+"\n"), 0o600)
		os.Chown(p, uid, 65534)
		out[s] = p
	}
	return out
}

// TestPasswordsLockoutAndSessions, from the attacker's side on the local
// socket: an account with a password gets nothing without a login; an
// administrator's password must be replaced at the first login, and the
// new one must meet the policy; wrong passwords lock the account after
// max_failures with the same answer as an unknown account (timing
// measured and logged); a session locks when idle and after a self-lock,
// and only a login unlocks it; an administrator ending a session ends
// the exec and logs -f streams running under it; no password reaches the log or the
// trail, and accounts.json holds Argon2id hashes only (CR 1.7, 1.10, 1.11, 2.5, 2.6, FIA_AFL.1, FTA_SSL).
func TestPasswordsLockoutAndSessions(t *testing.T) {
	d := startDaemon(t)
	d.args = []string{"--socket-group", "nogroup"}
	d.restartWithDevice("")
	d.installGuestOS()
	d.create("mine", "")
	const (
		initial = "Initial-Passw0rd"
		weak    = "weakpassword"
		good    = "Chosen-By-0perator"
		wrong   = "Guessed-Wr0ng-1"
		next    = "Another-Passw0rd-2"
	)
	home := filepath.Join(d.root, "op-home")
	f := secretFiles(t, home, 65534, initial, weak, good, wrong, next)
	adminFiles := secretFiles(t, filepath.Join(d.root, "admin-secrets"), 0, initial)
	sess := filepath.Join(home, "session")
	op := func(args ...string) (string, int) {
		return d.asUser(65534, append([]string{"--session-file", sess}, args...)...)
	}
	d.refuse("character classes", "user", "add", "op", "--role", "user", "--uid", "65534", "--container", "mine", "--password-file", f[weak])
	if out := d.must("user", "add", "op", "--role", "user", "--uid", "65534", "--container", "mine", "--password-file", adminFiles[initial]); !strings.Contains(out, "password=expired") {
		t.Errorf("an account with an administrator's password is not shown as expired: %s", out)
	}
	if out, code := op("list"); code == 0 || !strings.Contains(out, "log in first") {
		t.Errorf("an account with a password without a login: %d %s", code, out)
	}
	// The administrator's password must be replaced, by one that meets
	// the policy.
	if out, code := op("login", "--password-file", f[initial]); code == 0 || !strings.Contains(out, "expired") {
		t.Errorf("login with the administrator's password and no new one: %d %s", code, out)
	}
	if out, code := op("login", "--password-file", f[initial], "--new-password-file", f[weak]); code == 0 || !strings.Contains(out, "character classes") {
		t.Errorf("a weak new password: %d %s", code, out)
	}
	if out, code := op("login", "--password-file", f[initial], "--new-password-file", f[initial]); code == 0 || !strings.Contains(out, "used before") {
		t.Errorf("the same password again: %d %s", code, out)
	}
	if out, code := op("login", "--password-file", f[initial], "--new-password-file", f[good]); code != 0 || !strings.Contains(out, "logged in as op") {
		t.Fatalf("login with a new password: %d %s", code, out)
	}
	if out, code := op("list"); code != 0 || !strings.Contains(out, "mine") {
		t.Fatalf("list after login: %d %s", code, out)
	}
	if out := d.must("user", "list"); !strings.Contains(out, "password=yes") {
		t.Errorf("user list does not show the password:\n%s", out)
	}
	// A stolen token is no use to another uid (root here).
	if _, e, code := d.ctl("--session-file", sess, "whoami"); code == 0 || !strings.Contains(e, "no such session") {
		t.Errorf("the token from another uid: %d %s", code, e)
	}

	// Same answer for an unknown account and a wrong password; the time
	// each takes is measured (interleaved) and logged, not asserted.
	var tUnknown, tWrong []time.Duration
	var msgs []string
	for i := 0; i < 4; i++ {
		for _, name := range []string{"nobody", "op"} {
			t0 := time.Now()
			out, code := op("login", name, "--password-file", f[wrong])
			el := time.Since(t0)
			if code == 0 {
				t.Fatalf("login %s with a wrong password succeeded", name)
			}
			msgs = append(msgs, strings.TrimSpace(out))
			if name == "op" {
				tWrong = append(tWrong, el)
			} else {
				tUnknown = append(tUnknown, el)
			}
		}
	}
	for _, m := range msgs {
		if m != msgs[0] {
			t.Errorf("answers differ: %q vs %q", m, msgs[0])
		}
	}
	med := func(ds []time.Duration) time.Duration {
		s := slices.Clone(ds)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	t.Logf("login answer time, median of 4 interleaved: unknown account %v, wrong password %v (CR 1.10)", med(tUnknown), med(tWrong))
	// The 4 failures above count; the right password resets the count.
	if out, code := op("login", "--password-file", f[good]); code != 0 {
		t.Fatalf("login: %d %s", code, out)
	}
	// Lockout after 5 failures in a row; then the right password gets the
	// same answer; an administrator unlocks.
	for i := 0; i < 5; i++ {
		op("login", "--password-file", f[wrong])
	}
	if out, code := op("login", "--password-file", f[good]); code == 0 || strings.TrimSpace(out) != msgs[0] {
		t.Errorf("the right password on a locked account: %d %q", code, out)
	}
	if out := d.must("user", "list"); !strings.Contains(out, "locked (5 failed logins)") {
		t.Errorf("user list does not show the lock:\n%s", out)
	}
	if !d.hasAudit("control.Login", "failure", "account op is locked") || !d.hasAudit("control.Login", "failure", "no account") ||
		!d.hasAudit("control.Login", "failure", "account locked") {
		t.Errorf("the trail does not tell the failures apart")
	}
	d.must("user", "unlock", "op")
	if out, code := op("login", "--password-file", f[good]); code != 0 {
		t.Fatalf("login after unlock: %d %s", code, out)
	}
	// Password change: the old one is needed; the history refuses reuse.
	if out, code := op("user", "passwd", "--password-file", f[good], "--new-password-file", f[good]); code == 0 || !strings.Contains(out, "used before") {
		t.Errorf("reusing the current password: %d %s", code, out)
	}
	if out, code := op("user", "passwd", "--password-file", f[next], "--new-password-file", f[next]); code == 0 {
		t.Errorf("a password change with a wrong old password: %s", out)
	}
	if out, code := op("user", "passwd", "--password-file", f[good], "--new-password-file", f[next]); code != 0 {
		t.Errorf("password change: %d %s", code, out)
	}

	// Self-lock, then unlock by logging in again.
	if out, code := op("session", "lock"); code != 0 {
		t.Fatalf("session lock: %d %s", code, out)
	}
	if out, code := op("list"); code == 0 || !strings.Contains(out, "locked") {
		t.Errorf("a self-locked session: %d %s", code, out)
	}
	if out, code := op("login", "--password-file", f[next]); code != 0 {
		t.Fatalf("unlock: %d %s", code, out)
	}
	// Idle timeout.
	d.must("user", "policy", "--idle-timeout", "10s")
	time.Sleep(12 * time.Second)
	if out, code := op("list"); code == 0 || !strings.Contains(out, "locked") {
		t.Errorf("a session idle past the timeout: %d %s", code, out)
	}
	if out, code := op("login", "--password-file", f[next]); code != 0 {
		t.Fatalf("unlock after idle: %d %s", code, out)
	}
	if !d.hasAudit("access.session.lock", "success", "idle for 10s") || !d.hasAudit("control.SessionLock", "success", `"account":"op"`) {
		t.Error("session locks are not audited")
	}
	d.must("user", "policy", "--idle-timeout", "15m")

	// An administrator ends the session while an exec runs under it.
	d.must("start", "mine")
	ctl := filepath.Join(d.root, "cmlctl")
	ex := exec.Command(ctl, "--socket", d.socket, "--session-file", sess, "exec", "mine", "--", "sleep", "120")
	ex.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if err := ex.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- ex.Wait() }()
	lf := exec.Command(ctl, "--socket", d.socket, "--session-file", sess, "logs", "-f", "mine")
	lf.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if err := lf.Start(); err != nil {
		t.Fatal(err)
	}
	followed := make(chan error, 1)
	go func() { followed <- lf.Wait() }()
	time.Sleep(2 * time.Second)
	var list struct {
		Sessions []struct{ ID, Account string }
	}
	if err := json.Unmarshal([]byte(d.must("session", "list", "--all", "-o", "json")), &list); err != nil {
		t.Fatal(err)
	}
	var id string
	for _, s := range list.Sessions {
		if s.Account == "op" {
			id = s.ID
		}
	}
	if id == "" {
		t.Fatalf("op's session is not listed: %+v", list)
	}
	d.must("session", "end", id)
	select {
	case err := <-exited:
		if err == nil {
			t.Error("the exec ended as if nothing happened")
		}
	case <-time.After(20 * time.Second):
		ex.Process.Kill()
		t.Error("the exec stream outlived its ended session")
	}
	select {
	case <-followed:
	case <-time.After(20 * time.Second):
		lf.Process.Kill()
		t.Error("the logs -f stream outlived its ended session")
	}
	if out, code := op("list"); code == 0 || !strings.Contains(out, "no such session") {
		t.Errorf("after the session was ended: %d %s", code, out)
	}
	if !d.hasAudit("access.session.end", "success", "ended by root") {
		t.Error("ending another's session is not audited")
	}
	d.must("stop", "mine")

	// Logging in as another account (a password-only one, from the same
	// uid) ends the session the file held.
	d.must("user", "add", "op2", "--role", "auditor", "--password-file", adminFiles[initial])
	if out, code := op("login", "--password-file", f[next]); code != 0 {
		t.Fatalf("login: %d %s", code, out)
	}
	if out, code := op("login", "op2", "--password-file", f[initial], "--new-password-file", f[good]); code != 0 || !strings.Contains(out, "logged in as op2") {
		t.Fatalf("login as op2: %d %s", code, out)
	}
	if out := d.must("session", "list", "--all"); !strings.Contains(out, " op2 ") || strings.Contains(out, " op ") {
		t.Errorf("after logging in as another account, the sessions are:\n%s", out)
	}

	// No password in the daemon's log or the trail.
	logb := d.log.Bytes()
	trail := strings.Join(d.auditLines(), "\n")
	for _, pw := range []string{initial, good, wrong, next} {
		if strings.Contains(string(logb), pw) || strings.Contains(trail, pw) {
			t.Errorf("password %q leaked into the log or the trail", pw)
		}
	}
	b, _ := os.ReadFile(filepath.Join(d.stateDir, "accounts.json"))
	if strings.Contains(string(b), good) || !strings.Contains(string(b), "$argon2id$") {
		t.Error("accounts.json does not hold Argon2id hashes only")
	}
}

// TestLimitedTrustInRoot: with access.limited_root_trust, local root is
// not an administrator by its uid: it may only set the root account's
// first password, then must log in.
func TestLimitedTrustInRoot(t *testing.T) {
	d := startDaemon(t)
	d.restartWithDevice("access { limited_root_trust: true }\n")
	files := secretFiles(t, filepath.Join(d.root, "root-secrets"), 0, "", "Device-0wner-Secret")
	sess := filepath.Join(d.root, "root-secrets", "session")
	root := func(args ...string) []string { return append([]string{"--session-file", sess}, args...) }
	d.refuse("limited trust in root", root("list")...)
	d.refuse("limited trust in root", root("user", "add", "x", "--role", "administrator")...)
	d.must(root("user", "passwd", "root", "--password-file", files[""], "--new-password-file", files["Device-0wner-Secret"])...)
	d.refuse("log in first", root("list")...)
	// The first password is set once: then root's uid alone is refused,
	// and a change needs the old password.
	d.refuse("log in first", root("user", "passwd", "root", "--password-file", files[""], "--new-password-file", files["Device-0wner-Secret"])...)
	d.must(root("login", "--password-file", files["Device-0wner-Secret"])...)
	d.must(root("list")...)
	d.refuse("password change failed", root("user", "passwd", "root", "--password-file", files[""], "--new-password-file", files["Device-0wner-Secret"])...)
	if out := d.must(root("user", "policy")...); !strings.Contains(out, "limited-root-trust true") {
		t.Errorf("policy does not show limited trust in root:\n%s", out)
	}
	if !d.hasAudit("access.settings", "success", "limited_root_trust=true") {
		t.Error("the device setting's change is not audited")
	}
}
