package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

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
	// nobody, with an account of role user, reaches the socket (list
	// works) but not the trail. (Its own copy of cmlctl: the build
	// directory is private.)
	d.must("user", "add", "nob", "--role", "user", "--uid", "65534")
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
		if o, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(o), "refused") {
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

// trailOnSmallFS stops cmld and moves its trail to a 256 KiB tmpfs bound
// over its path, filled on purpose to leave room for about a hundred
// records beyond the reserve.
func trailOnSmallFS(t *testing.T, d *daemon) {
	t.Helper()
	d.cmd.Process.Signal(os.Interrupt)
	d.cmd.Wait()
	fs := filepath.Join(d.root, "auditfs")
	os.MkdirAll(fs, 0o700)
	if err := syscall.Mount("tmpfs", fs, "tmpfs", 0, "size=256k"); err != nil {
		t.Skipf("tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(fs, syscall.MNT_DETACH) })
	log := filepath.Join(d.stateDir, "audit.log")
	audit.SetAppendOnly(log, false)
	b, _ := os.ReadFile(log)
	os.WriteFile(filepath.Join(fs, "audit.log"), b, 0o600)
	if err := syscall.Mount(filepath.Join(fs, "audit.log"), log, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(log, syscall.MNT_DETACH) })
	var st syscall.Statfs_t
	syscall.Statfs(fs, &st)
	os.WriteFile(filepath.Join(fs, "filler"), make([]byte, int64(st.Bavail)*st.Bsize-(16<<10)-48<<10), 0o600)
}

// TestAuditFullHalts: with when_full HALT, a full trail stops the
// containers and ends cmld, with the reason.
func TestAuditFullHalts(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("a", "")
	trailOnSmallFS(t, d)
	d.restartWithDevice("audit { when_full: HALT }\n")
	d.must("start", "a")
	exited := make(chan error, 1)
	go func() { exited <- d.cmd.Wait() }()
	for n := 0; n < 400; n++ {
		if _, _, code := d.ctl("create", d.signedConfig(fmt.Sprint("h", n), fmt.Sprintf("name: \"h%d\"\nguest_os: \"busybox\"\n", n))); code != 0 {
			break
		}
	}
	select {
	case err := <-exited:
		if err == nil || !strings.Contains(d.log.String(), "halted") {
			t.Errorf("cmld ended with %v; log:\n%s", err, d.log)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("cmld did not halt on a full trail")
	}
	if out, _ := exec.Command("runc", "--root", filepath.Join(d.run, "runtime"), "list", "-q").Output(); strings.TrimSpace(string(out)) != "" {
		t.Errorf("containers still run after the halt: %s", out)
	}
}

// TestAuditFullFailsClosed: the trail on a small filesystem filled on
// purpose: before it is full, management calls are refused with one line
// and do not happen; the configured action stops the containers; no
// record is lost (the trail verifies, every sequence number present).
func TestAuditFullFailsClosed(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("a", "")
	trailOnSmallFS(t, d)
	d.restartWithDevice("audit { when_full: STOP_CONTAINERS }\n")
	if !d.hasAudit("audit.settings", "success", "when_full=STOP_CONTAINERS") {
		t.Errorf("the change of audit settings is not audited")
	}
	d.must("start", "a")
	var refused string
	var n int
	for n = 0; n < 400; n++ {
		_, e, code := d.ctl("create", d.signedConfig(fmt.Sprint("b", n), fmt.Sprintf("name: \"b%d\"\nguest_os: \"busybox\"\n", n)))
		if code != 0 {
			refused = strings.TrimSpace(e)
			break
		}
	}
	if refused == "" || !strings.Contains(refused, "audit trail is full") || strings.Contains(refused, "\n") {
		t.Fatalf("after %d creates, no one-line refusal: %q", n, refused)
	}
	if strings.Contains(d.must("list"), fmt.Sprint("b", n, " ")) {
		t.Errorf("the refused create happened")
	}
	d.waitState("a", "STOPPED", 20*time.Second)
	// Nothing lost: the trail verifies and its records are consecutive.
	c := exec.Command(filepath.Join(binDir, "cmlverify"), "audit", "--cert", filepath.Join(d.stateDir, "identity", "tls.pem"), filepath.Join(d.stateDir, "audit.log"))
	if o, err := c.CombinedOutput(); err != nil {
		t.Errorf("cmlverify audit on the full trail: %v %s", err, o)
	}
	audited := 0
	for _, l := range d.auditLines() {
		if strings.Contains(l, `"operation":"control.Create"`) && strings.Contains(l, `"outcome":"success"`) && strings.Contains(l, `"object":"b`) {
			audited++
		}
	}
	if audited != n {
		t.Errorf("%d creates happened, %d audited", n, audited)
	}
}

// TestSeccompDenialsAudited: a system call the container's seccomp
// profile denies shows in the trail, naming the container (through the
// kernel's audit multicast, beside any auditd); a flood of them is
// bounded with a summary.
func TestSeccompDenialsAudited(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("sc", "")
	d.must("start", "sc")
	d.exec("sc", "mount -t tmpfs none /mnt 2>/dev/null; true")
	waitFor(t, 5*time.Second, func() bool {
		return d.hasAudit("container.seccomp", "failure", "system call mount denied") && d.hasAudit("container.seccomp", "failure", `"object":"sc/`)
	}, "audit record of the denied mount naming container sc")
	d.exec("sc", "i=0; while [ $i -lt 300 ]; do swapoff /dev/null 2>/dev/null; i=$((i+1)); done; true")
	waitFor(t, 5*time.Second, func() bool { return d.hasAudit("container.seccomp.summary", "failure", "more denied system calls") }, "summary of the flood")
	n := 0
	for _, l := range d.auditLines() {
		if strings.Contains(l, `"operation":"container.seccomp"`) && strings.Contains(l, "swapoff") {
			n++
		}
	}
	if n == 0 || n > 40 {
		t.Errorf("%d individual records for 300 denied calls (bounded to 10 per second)", n)
	}
}

// TestAuditSurvivesKillDuringWrites: cmld killed with SIGKILL while many
// clients write to the trail: after the restart the trail verifies (any
// torn last record moved aside) and sequence numbers go on.
func TestAuditSurvivesKillDuringWrites(t *testing.T) {
	d := startDaemon(t)
	stop := make(chan struct{})
	done := make(chan struct{})
	for w := 0; w < 8; w++ {
		go func() {
			for {
				select {
				case <-stop:
					done <- struct{}{}
					return
				default:
				}
				exec.Command(filepath.Join(binDir, "cmlctl"), "--socket", d.socket, "start", "nosuch").Run()
			}
		}()
	}
	time.Sleep(1500 * time.Millisecond)
	d.crash()
	close(stop)
	for w := 0; w < 8; w++ {
		<-done
	}
	before := d.lastSeq()
	d.start()
	if out, _, code := d.ctl("audit", "verify"); code != 0 || !strings.Contains(out, "audit trail OK") {
		t.Errorf("after kill -9 during writes: %d %s", code, out)
	}
	d.ctl("start", "nosuch")
	if after := d.lastSeq(); after <= before {
		t.Errorf("sequence did not go on: %d then %d", before, after)
	}
}
