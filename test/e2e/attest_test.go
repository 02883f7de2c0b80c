package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// cmlverify runs the verifier against this daemon's socket (or a saved
// answer) with the test PKIs and returns its verdict and exit status.
func (d *daemon) cmlverify(fleet string, extra ...string) (verdict struct {
	OK         bool
	Device     string
	Containers []struct {
		Name   string
		Starts int
		OK     bool
		Detail string
	}
}, out string, code int) {
	d.t.Helper()
	args := append([]string{"--fleet-ca", filepath.Join(fleet, "root-ca.pem"), "--trust", filepath.Join(pkiDir, "root-ca.pem"),
		"--reference", guestOSDir, "--reference", filepath.Join(d.root, "refs"), "--json"}, extra...)
	cmd := exec.Command(filepath.Join(binDir, "cmlverify"), args...)
	b, err := cmd.Output()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
		if code == 2 {
			d.t.Fatalf("cmlverify: usage error: %s", ee.Stderr)
		}
	} else if err != nil {
		d.t.Fatal(err)
	}
	if err := json.Unmarshal(b, &verdict); err != nil {
		d.t.Fatalf("cmlverify output %q: %v", b, err)
	}
	return verdict, string(b), code
}

// provisionIdentity runs the fleet operator's provisioning: CSRs from the
// device, certificates from the fleet CA (cmlsign pki device), installed
// with cmlctl, then provisioning ended.
func (d *daemon) provisionIdentity(fleet string) {
	d.t.Helper()
	for _, key := range []string{"tls", "attestation"} {
		csr := filepath.Join(d.root, key+".csr")
		args := []string{"device", "csr", "-f", csr}
		if key == "attestation" {
			args = append(args, "--attestation")
		}
		d.must(args...)
		if out, err := exec.Command("openssl", "req", "-in", csr, "-noout", "-verify").CombinedOutput(); err != nil {
			d.t.Fatalf("openssl rejects the device's %s CSR: %s", key, out)
		}
		cert := filepath.Join(d.root, key+".pem")
		if out, err := exec.Command(filepath.Join(binDir, "cmlsign"), "pki", "device", "--ca-cert", filepath.Join(fleet, "root-ca.pem"),
			"--ca-key", filepath.Join(fleet, "root-ca.key"), "--csr", csr, "--out", cert).CombinedOutput(); err != nil {
			d.t.Fatalf("cmlsign pki device: %v\n%s", err, out)
		}
		if key == "tls" {
			d.refuse("self-signed", "device", "provisioned")
		}
		d.must("device", "cert", cert)
	}
	d.must("device", "provisioned")
}

// TestAttestationEndToEnd provisions a device, runs a container, and has
// cmlverify check it over the control socket and from a saved answer,
// across a cmld restart that resets the swtpm's PCRs under the running
// container.
func TestAttestationEndToEnd(t *testing.T) {
	d := startDaemon(t)
	fleet := filepath.Join(d.root, "fleet")
	if out, err := exec.Command(filepath.Join(binDir, "cmlsign"), "pki", "init", "--dir", fleet, "--org", "fleet").CombinedOutput(); err != nil {
		t.Fatalf("fleet CA: %s", out)
	}
	if out := d.must("device", "info"); !strings.Contains(out, "not provisioned") || !strings.Contains(out, "self-signed") {
		t.Errorf("fresh device:\n%s", out)
	}
	d.provisionIdentity(fleet)
	if out := d.must("device", "info"); !strings.Contains(out, "state:        provisioned") {
		t.Errorf("after provisioning:\n%s", out)
	}
	// After provisioning, identity changes need the audited replace step.
	d.refuse("replace", "device", "cert", filepath.Join(d.root, "tls.pem"))
	d.must("device", "cert", "--replace", filepath.Join(d.root, "tls.pem"))
	if !strings.Contains(strings.Join(d.auditLines(), "\n"), "device.cert.replace") {
		t.Error("certificate replacement not audited")
	}

	d.installGuestOS()
	os.MkdirAll(filepath.Join(d.root, "refs"), 0o755)
	cfg := d.signedConfig("refs/web", "name: \"web\"\nguest_os: \"busybox\"\n")
	d.must("create", cfg)
	d.must("start", "web")
	v, out, code := d.cmlverify(fleet, "--socket", d.socket)
	if code != 0 || !v.OK || len(v.Containers) != 1 || v.Containers[0].Name != "web" || !v.Containers[0].OK {
		t.Fatalf("cmlverify of an honest device: exit %d\n%s", code, out)
	}

	// A cmld restart restarts its swtpm: PCRs start over under the
	// running container, which is measured again.
	d.crash()
	d.start()
	v, out, code = d.cmlverify(fleet, "--socket", d.socket)
	if code != 0 || len(v.Containers) != 1 || v.Containers[0].Name != "web" {
		t.Fatalf("after a restart: exit %d\n%s", code, out)
	}
	d.must("stop", "web")
	d.must("start", "web")

	// A saved answer, checked against the nonce it was made for.
	ans := filepath.Join(d.root, "answer.json")
	nonce := "00112233445566778899aabbccddeeff"
	d.must("device", "attest", "--nonce", nonce, "-f", ans)
	v, out, code = d.cmlverify(fleet, "--nonce", nonce, ans)
	if code != 0 || v.Containers[0].Starts != 2 {
		t.Fatalf("saved answer: exit %d\n%s", code, out)
	}
	if _, out, code = d.cmlverify(fleet, "--nonce", "ffeeddccbbaa99887766554433221100", ans); code != 1 || !strings.Contains(out, "nonce") {
		t.Fatalf("replayed answer: exit %d\n%s", code, out)
	}
	// A container whose config is not among the verifier's references
	// makes the device fail attestation, naming that container.
	// Watch mode reports the change when it happens.
	watch := exec.Command(filepath.Join(binDir, "cmlverify"), "--fleet-ca", filepath.Join(fleet, "root-ca.pem"), "--trust", filepath.Join(pkiDir, "root-ca.pem"),
		"--reference", guestOSDir, "--reference", filepath.Join(d.root, "refs"), "--json", "--socket", d.socket, "--watch", "200ms")
	var watched strings.Builder
	watch.Stdout = &watched
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	plain := d.signedConfig("other", "name: \"other\"\nguest_os: \"busybox\"\n")
	d.must("create", plain)
	d.must("start", "other")
	time.Sleep(time.Second)
	watch.Process.Signal(syscall.SIGTERM)
	watch.Wait()
	if lines := strings.Split(strings.TrimSpace(watched.String()), "\n"); len(lines) != 2 || !strings.Contains(lines[0], `"ok":true`) || !strings.Contains(lines[1], "not among the trusted signed configs") {
		t.Errorf("watch mode: want one passing then one failing verdict, got:\n%s", watched.String())
	}
	v, out, code = d.cmlverify(fleet, "--socket", d.socket)
	if code != 1 || v.OK || !strings.Contains(out, "not among the trusted signed configs") {
		t.Fatalf("unknown config: exit %d\n%s", code, out)
	}
	// Attestation requests with bad nonces are refused with one line.
	d.refuse("nonce of 2 bytes", "device", "attest", "--nonce", "0011")
	d.refuse("PCR 24 does not exist", "device", "attest", "--pcrs", "24")
}

// TestRollbackCounterSurvivesStateRestore installs version 2, puts back a
// copy of the state directory from before (as a root attacker or a
// careless restore would), and tries to install version 1. The TPM's NV
// counter still says 2. The control restores the TPM's state too (which a
// hardware TPM would not allow): then the downgrade goes through, showing
// the refusal came from the TPM.
func TestRollbackCounterSurvivesStateRestore(t *testing.T) {
	d := startDaemon(t)
	d.crash()
	backup := filepath.Join(d.root, "backup")
	if out, err := exec.Command("cp", "-a", d.stateDir, backup).CombinedOutput(); err != nil {
		t.Fatalf("backup: %s", out)
	}
	d.start()
	v2 := filepath.Join(d.root, "v2")
	if err := buildGuestOS(v2, "busybox", 2); err != nil {
		t.Fatal(err)
	}
	d.must("guestos", "install", v2)
	d.crash()
	restore := func(withTPM bool) {
		ents, _ := os.ReadDir(d.stateDir)
		for _, e := range ents {
			if e.Name() == "tpm" && !withTPM {
				continue
			}
			os.RemoveAll(filepath.Join(d.stateDir, e.Name()))
			if out, err := exec.Command("cp", "-a", filepath.Join(backup, e.Name()), d.stateDir).CombinedOutput(); err != nil && !os.IsNotExist(err) {
				t.Logf("restore %s: %s", e.Name(), out)
			}
		}
	}
	restore(false)
	d.start()
	if out := d.must("guestos", "list"); strings.Contains(out, "busybox") {
		t.Fatalf("restore did not remove version 2:\n%s", out)
	}
	d.refuse("rollback protection", "guestos", "install", guestOSDir)
	d.crash()
	restore(true)
	d.start()
	d.must("guestos", "install", guestOSDir)
}

// TestStartRefusedWhenNotMeasured: when the start cannot be recorded in
// the measurement log, the container does not run (fail closed), and the
// refusal is audited.
func TestStartRefusedWhenNotMeasured(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("m", "")
	log := filepath.Join(d.stateDir, "measurements.cel")
	os.Remove(log)
	if err := os.Mkdir(log, 0o700); err != nil {
		t.Fatal(err)
	}
	d.refuse("measure into the TPM", "start", "m")
	if st := d.state("m"); st == "RUNNING" {
		t.Fatal("an unmeasured container runs")
	}
	if !d.hasAudit("container.measure", "failure", "m") {
		t.Error("the failed measurement is not audited")
	}
}
