package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/cmlproject/cml/internal/audit"
)

// TestAuditTrailTamperEvident: the trail verifies on the device and off it
// (cmlverify audit, with the device's certificate); one edited record is
// named by both; auditors select records; a local user who may use the
// control socket but is no auditor cannot read the trail (FAU_SAR.2).
func TestAuditTrailTamperEvident(t *testing.T) {
	d := startDaemon(t)
	// nobody's group may use the socket: the audit calls must still
	// refuse it.
	d.args = []string{"--socket-group", "nogroup"}
	d.restartWithDevice("")
	d.installGuestOS()
	d.create("a", "")
	d.must("start", "a")
	d.must("stop", "a")
	if out := d.must("audit", "verify"); !strings.Contains(out, "audit trail OK") {
		t.Errorf("audit verify: %s", out)
	}
	out := d.must("audit", "show", "--operation", "control.Create", "--object", "a", "--outcome", "success")
	if n := strings.Count(strings.TrimSpace(out), "\n") + 1; n != 1 || !strings.Contains(out, `"seq":`) {
		t.Errorf("selected %d records:\n%s", n, out)
	}
	if out := d.must("audit", "status"); !strings.Contains(out, "last checkpoint") {
		t.Errorf("status: %s", out)
	}
	// nobody reaches the socket (list works) but not the trail. (Its
	// own copy of cmlctl: the build directory is private.)
	ctl := filepath.Join(d.root, "cmlctl")
	if b, err := os.ReadFile(filepath.Join(binDir, "cmlctl")); err != nil || os.WriteFile(ctl, b, 0o755) != nil {
		t.Fatal("copy cmlctl")
	}
	cmd := exec.Command(ctl, "--socket", d.socket, "list")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if o, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nobody cannot use the socket at all (the test needs it to): %v %s", err, o)
	}
	for _, args := range [][]string{{"audit", "show"}, {"audit", "verify"}, {"audit", "status"}} {
		cmd := exec.Command(ctl, append([]string{"--socket", d.socket}, args...)...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		if o, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(o), "auditor") {
			t.Errorf("nobody: cmlctl %v: %v %s", args, err, o)
		}
	}
	if ok, o := asNobody(t, "cat "+filepath.Join(d.stateDir, "audit.log")); ok {
		t.Errorf("nobody reads the trail file: %s", o)
	}

	// Off the device: the trail, its checkpoints (the last written at
	// shutdown) and the device certificate.
	d.cmd.Process.Signal(os.Interrupt)
	d.cmd.Wait()
	log := filepath.Join(d.stateDir, "audit.log")
	cert := filepath.Join(d.stateDir, "identity", "tls.pem")
	verify := func() (string, int) {
		c := exec.Command(filepath.Join(binDir, "cmlverify"), "audit", "--cert", cert, "--checkpoints", log+".checkpoints", log)
		o, err := c.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		return string(o), code
	}
	if o, code := verify(); code != 0 || !strings.Contains(o, "audit trail OK") {
		t.Fatalf("cmlverify audit on the untouched trail: %d %s", code, o)
	}
	b, _ := os.ReadFile(log)
	lines := bytes.Split(b, []byte("\n"))
	var victim int
	for i, l := range lines {
		if bytes.Contains(l, []byte(`"operation":"control.Start"`)) {
			victim = i
		}
	}
	lines[victim] = bytes.Replace(lines[victim], []byte(`"outcome":"success"`), []byte(`"outcome":"failure"`), 1)
	// The trail is append-only: even root must lift that first.
	if err := os.WriteFile(log, bytes.Join(lines, []byte("\n")), 0o600); err == nil {
		t.Errorf("root rewrote the trail without lifting its append-only attribute")
	}
	audit.SetAppendOnly(log, false)
	if err := os.WriteFile(log, bytes.Join(lines, []byte("\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	o, code := verify()
	if code != 1 || !strings.Contains(o, "modified") || !strings.Contains(o, "line "+itoa(victim+1)) {
		t.Errorf("cmlverify audit on an edited record (line %d): %d %s", victim+1, code, o)
	}
	d.start()
	if out, _, code := d.ctl("audit", "verify"); code != 1 || !strings.Contains(out, "FAILED") {
		t.Errorf("the device's own verify of the edited trail: %d %s", code, out)
	}
	if !d.hasAudit("audit.verify", "failure", "modified") {
		t.Errorf("the failed verification is not in the trail")
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
