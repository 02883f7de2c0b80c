package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// asUser runs cmlctl as a local user (uid/gid), with its own copy of
// cmlctl (the build directory is private).
func (d *daemon) asUser(uid uint32, args ...string) (string, int) {
	d.t.Helper()
	ctl := filepath.Join(d.root, "cmlctl")
	if _, err := os.Stat(ctl); err != nil {
		b, _ := os.ReadFile(filepath.Join(binDir, "cmlctl"))
		os.WriteFile(ctl, b, 0o755)
	}
	cmd := exec.Command(ctl, append([]string{"--socket", d.socket}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	}
	return string(out), code
}

// TestRolesOnTheLocalSocket: every call goes through the authorization
// table. A local user with no account gets nothing; mapped to an account
// of role user it operates only its own containers and cannot manage or
// read the trail; locked, it gets nothing; its calls and refusals are
// audited with its account (CR 1.1, CR 2.1, CR 2.12, FDP_ACC/ACF).
func TestRolesOnTheLocalSocket(t *testing.T) {
	d := startDaemon(t)
	d.args = []string{"--socket-group", "nogroup"}
	d.restartWithDevice("")
	d.installGuestOS()
	d.create("mine", "")
	d.create("theirs", "")
	xconf := d.signedConfig("x", "name: \"x\"\nguest_os: \"busybox\"\n")
	os.Chmod(xconf, 0o644)
	os.Chmod(xconf+".sig", 0o644)
	os.Chmod(xconf+".cert", 0o644)
	if out, code := d.asUser(65534, "list"); code == 0 || !strings.Contains(out, "no account") {
		t.Errorf("a local user without an account: %d %s", code, out)
	}
	d.must("user", "add", "op", "--role", "user", "--uid", "65534", "--container", "mine")
	if out, _ := d.asUser(65534, "whoami"); !strings.Contains(out, "op roles=user") {
		t.Errorf("whoami: %s", out)
	}
	if out, code := d.asUser(65534, "list"); code != 0 || !strings.Contains(out, "mine") || strings.Contains(out, "theirs") {
		t.Errorf("a user's list: %d %s", code, out)
	}
	for _, args := range [][]string{{"start", "mine"}, {"exec", "mine", "--", "true"}, {"stop", "mine"}} {
		if out, code := d.asUser(65534, args...); code != 0 {
			t.Errorf("user: %v: %d %s", args, code, out)
		}
	}
	uuid := uuidOf(t, d, "theirs")
	for _, args := range [][]string{{"start", "theirs"}, {"start", uuid}, {"exec", "theirs", "--", "true"}, {"logs", "theirs"},
		{"create", xconf}, {"remove", "mine"}, {"audit", "show"}, {"user", "add", "x", "--role", "administrator"},
		{"guestos", "remove", "busybox", "1"}, {"device", "wipe", "--yes"}} {
		if out, code := d.asUser(65534, args...); code == 0 || !strings.Contains(out, "refused") {
			t.Errorf("user: %v allowed or unclear: %d %s", args, code, out)
		}
	}
	if !d.hasAudit("control.Start", "success", `"account":"op"`) || !d.hasAudit("control.Start", "failure", `"account":"op"`) {
		t.Errorf("the user's calls and refusals are not audited with its account")
	}
	d.must("user", "lock", "op")
	if out, code := d.asUser(65534, "list"); code == 0 || !strings.Contains(out, "locked") {
		t.Errorf("a locked account: %d %s", code, out)
	}
	d.must("user", "unlock", "op")
	d.must("user", "roles", "op", "--role", "auditor")
	if out, code := d.asUser(65534, "audit", "status"); code != 0 {
		t.Errorf("an auditor reads the trail's status: %d %s", code, out)
	}
	if out, code := d.asUser(65534, "start", "mine"); code == 0 {
		t.Errorf("an auditor started a container: %s", out)
	}
	// Root keeps working unchanged (the README's workflow).
	d.must("start", "theirs")
	d.must("stop", "theirs")
	d.refuse("built in", "user", "remove", "root")
}
