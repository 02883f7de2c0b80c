// Package e2e tests a real cmld, driven through the real cmlctl, running
// containers on a real runc. Every test needs root and skips without it.
package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
	"github.com/vishvananda/netlink"

	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/rootfs"
	"github.com/cmlproject/cml/internal/storage"
	"github.com/cmlproject/cml/internal/testutil"
	"github.com/cmlproject/cml/internal/tpm"
)

var (
	binDir     string // cmld, cmlctl and cmlsign built for this run
	guestOSDir string // the busybox demo guest OS, version 1, signed
	pkiDir     string // the vendor PKI: root-ca.pem, signer.pem, signer.key
)

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("e2e: not root; every test skips")
		os.Exit(m.Run())
	}
	tmp, err := os.MkdirTemp("", "cml-e2e-")
	if err != nil {
		panic(err)
	}
	// cmlctl's settings come from the tests only, never from a config
	// file or session of the user running them.
	os.Setenv("XDG_CONFIG_HOME", filepath.Join(tmp, "config"))
	os.Setenv("XDG_RUNTIME_DIR", filepath.Join(tmp, "runtime"))
	for _, v := range []string{"CML_CONFIG", "CML_REMOTE", "CML_CERT", "CML_KEY", "CML_CA", "CML_SESSION_FILE", "CML_PKCS11_MODULE", "CML_KEY_LABEL", "CML_TOKEN_LABEL"} {
		os.Unsetenv(v)
	}
	// The VM lane (scripts/vm-test.sh) has no Go toolchain inside: it
	// hands over binaries, PKI and guest OS built on the host.
	if dir := os.Getenv("CML_E2E_PREBUILT"); dir != "" {
		binDir, pkiDir, guestOSDir = filepath.Join(dir, "bin"), filepath.Join(dir, "pki"), filepath.Join(dir, "guestos")
		code := m.Run()
		os.RemoveAll(tmp)
		os.Exit(code)
	}
	binDir = filepath.Join(tmp, "bin")
	build := exec.Command("go", "build", "-o", binDir+"/", "github.com/cmlproject/cml/cmd/...")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		fmt.Println("e2e: build:", err)
		os.Exit(1)
	}
	// The network probe runs inside busybox containers: static.
	build = exec.Command("go", "build", "-o", binDir+"/nettool", "./nettool")
	build.Env, build.Stderr = append(os.Environ(), "CGO_ENABLED=0"), os.Stderr
	if err := build.Run(); err != nil {
		fmt.Println("e2e: build nettool:", err)
		os.Exit(1)
	}
	pkiDir = filepath.Join(tmp, "pki")
	guestOSDir = filepath.Join(tmp, "guestos")
	if err := buildGuestOS(guestOSDir, "busybox", 1); err != nil {
		fmt.Println("e2e:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(tmp)
	os.Exit(code)
}

// buildGuestOS builds and signs a busybox guest OS with the test PKI,
// making the PKI on first use, as a build pipeline would.
func buildGuestOS(out, name string, version int) error {
	if _, err := os.Stat(filepath.Join(pkiDir, "signer.key")); err != nil {
		if out, err := exec.Command(filepath.Join(binDir, "cmlsign"), "pki", "init", "--dir", pkiDir).CombinedOutput(); err != nil {
			return fmt.Errorf("cmlsign pki init: %v\n%s", err, out)
		}
	}
	cmd := exec.Command("../../scripts/build-demo-guestos.sh", out, pkiDir, name, fmt.Sprint(version))
	cmd.Env = append(os.Environ(), "CMLSIGN="+filepath.Join(binDir, "cmlsign"))
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build guest OS: %v\n%s", err, out)
	}
	return nil
}

// daemon is one cmld under test with its own state and run directories.
type daemon struct {
	t        *testing.T
	root     string
	stateDir string
	run      string
	socket   string
	cmd      *exec.Cmd
	log      *bytes.Buffer
	// runtime, when set, is the OCI runtime cmld is started with.
	runtime string
	// args are further cmld arguments.
	args []string
	// table and nflog are this daemon's nftables table and NFLOG group:
	// its own, so that no test touches another cmld's firewall.
	table string
	nflog int
}

var daemons atomic.Int32

// startDaemon starts cmld on a fresh temporary state directory; everything
// it leaves (containers, mounts, cgroups) is removed at cleanup, also when
// the test fails.
func startDaemon(t *testing.T) *daemon {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "runc")
	root, err := os.MkdirTemp("", "cml-e2e-d-")
	if err != nil {
		t.Fatal(err)
	}
	// Container roots (subordinate uids) must traverse to their rootfs.
	os.Chmod(root, 0o711)
	n := int(daemons.Add(1))
	d := &daemon{t: t, root: root, stateDir: filepath.Join(root, "state"), run: filepath.Join(root, "run"),
		table: fmt.Sprintf("cmle2e%d_%d", os.Getpid(), n), nflog: 3000 + os.Getpid()%500*20 + n%20}
	d.socket = filepath.Join(d.run, "control.sock")
	t.Cleanup(d.cleanup)
	d.provision()
	if kernelTPM() {
		// A kernel TPM keeps its PCRs across daemons; every test starts
		// a new device state, so each measures into the resettable
		// PCR 23, reset first (a restart within a test keeps it).
		resetPCR(t, kernelTPMPCR)
	}
	os.WriteFile(filepath.Join(d.stateDir, "device.conf"), []byte(d.deviceConf("")), 0o600)
	d.start()
	return d
}

// kernelTPMPCR is the PCR tests measure into on a host with a kernel TPM:
// 23, or CML_E2E_PCR (16, the other resettable one) when two test
// processes share the TPM.
var kernelTPMPCR = func() int {
	if os.Getenv("CML_E2E_PCR") == "16" {
		return 16
	}
	return 23
}()

func kernelTPM() bool {
	_, err := os.Stat(tpm.DevicePath)
	return err == nil
}

// deviceConf adds the test PCR (on a kernel TPM) and, unless text has a
// network section, the daemon's own firewall table to a device.conf.
func (d *daemon) deviceConf(text string) string {
	if kernelTPM() && !strings.Contains(text, "measurement_pcr") {
		text += fmt.Sprintf("measurement_pcr: %d\n", kernelTPMPCR)
	}
	if !strings.Contains(text, "network {") {
		text += d.networkConf("")
	}
	return text
}

// networkConf is a device.conf network section with the daemon's table
// and NFLOG group and the given further settings.
func (d *daemon) networkConf(extra string) string {
	return fmt.Sprintf("network {\n  nft_table: %q\n  nflog_group: %d\n%s}\n", d.table, d.nflog, extra)
}

func resetPCR(t *testing.T, pcr int) {
	t.Helper()
	f, err := os.OpenFile(tpm.DevicePath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := tpm2.PCRReset(f, tpmutil.Handle(pcr)); err != nil {
		t.Fatalf("reset PCR %d: %v", pcr, err)
	}
}

// provision installs the test PKI's root as the device's vendor CA, as the
// device installer does.
func (d *daemon) provision() {
	d.t.Helper()
	dir := filepath.Join(d.stateDir, "trust", "vendor")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		d.t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(pkiDir, "root-ca.pem"))
	if err != nil {
		d.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "vendor.pem"), b, 0o600); err != nil {
		d.t.Fatal(err)
	}
}

func (d *daemon) start() {
	d.t.Helper()
	d.log = &bytes.Buffer{}
	args := []string{"--state-dir", d.stateDir, "--run-dir", d.run}
	if d.runtime != "" {
		args = append(args, "--runtime", d.runtime)
	}
	args = append(args, d.args...)
	d.cmd = exec.Command(filepath.Join(binDir, "cmld"), args...)
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		// Up when it answers (under limited trust in root, with a
		// refusal).
		if _, e, code := d.ctl("list"); code == 0 || strings.Contains(e, "limited trust in root") {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	d.t.Fatalf("cmld did not come up:\n%s", d.log)
}

// crash kills cmld with SIGKILL, leaving its containers running.
func (d *daemon) crash() {
	d.cmd.Process.Signal(syscall.SIGKILL)
	d.cmd.Wait()
}

func (d *daemon) cleanup() {
	if d.cmd != nil && d.cmd.ProcessState == nil {
		d.cmd.Process.Signal(syscall.SIGKILL)
		d.cmd.Wait()
	}
	if d.t.Failed() && d.log != nil {
		d.t.Logf("cmld log:\n%s", d.log)
	}
	rt := filepath.Join(d.run, "runtime")
	if out, err := exec.Command("runc", "--root", rt, "list", "-q").Output(); err == nil {
		for _, id := range strings.Fields(string(out)) {
			exec.Command("runc", "--root", rt, "delete", "--force", id).Run()
		}
	}
	// Encrypted volumes: a killed cmld's mount namespace lives on in its
	// gocryptfs processes; empty it, then end them.
	storage.CleanupUnder(d.root, d.root, nil)
	// The trail is append-only (chattr +a): lift that to delete it.
	audit.SetAppendOnly(filepath.Join(d.stateDir, "audit.log"), false)
	audit.SetAppendOnly(filepath.Join(d.stateDir, "audit.log.checkpoints"), false)
	rootfs.Unmount(d.root)
	os.RemoveAll(d.root)
	// The daemon's firewall table outlives it by design; a test's goes.
	exec.Command("nft", "delete", "table", "inet", d.table).Run()
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			if strings.HasPrefix(l.Attrs().Alias, d.table+":") {
				netlink.LinkDel(l)
			}
		}
	}
}

// ctl runs cmlctl against this daemon.
func (d *daemon) ctl(args ...string) (stdout, stderr string, code int) {
	cmd := exec.Command(filepath.Join(binDir, "cmlctl"), append([]string{"--socket", d.socket}, args...)...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code = 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		d.t.Fatal(err)
	}
	return o.String(), e.String(), code
}

// must runs cmlctl and fails the test unless it succeeds.
func (d *daemon) must(args ...string) string {
	d.t.Helper()
	out, errOut, code := d.ctl(args...)
	if code != 0 {
		d.t.Fatalf("cmlctl %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

// refuse runs cmlctl, expects failure with a one-line message containing
// want, and returns the message.
func (d *daemon) refuse(want string, args ...string) string {
	d.t.Helper()
	_, errOut, code := d.ctl(args...)
	if code == 0 {
		d.t.Fatalf("cmlctl %s succeeded, want refusal", strings.Join(args, " "))
	}
	msg := strings.TrimRight(errOut, "\n")
	if strings.Count(msg, "\n") != 0 {
		d.t.Errorf("cmlctl %s: error is not one line:\n%s", strings.Join(args, " "), msg)
	}
	if !strings.Contains(msg, want) {
		d.t.Errorf("cmlctl %s: error %q does not mention %q", strings.Join(args, " "), msg, want)
	}
	return msg
}

// installGuestOS installs the demo guest OS.
func (d *daemon) installGuestOS() {
	d.t.Helper()
	d.must("guestos", "install", guestOSDir)
}

// create writes a config with the given body, signs it and creates the
// container.
func (d *daemon) create(name, body string) {
	d.t.Helper()
	d.must("create", d.signedConfig(name, fmt.Sprintf("name: %q\nguest_os: \"busybox\"\n%s", name, body)))
}

// signedConfig writes text to <root>/<file>.conf and signs it with cmlsign.
func (d *daemon) signedConfig(file, text string) string {
	d.t.Helper()
	p := filepath.Join(d.root, file+".conf")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		d.t.Fatal(err)
	}
	if out, err := exec.Command(filepath.Join(binDir, "cmlsign"), "config", "--key", filepath.Join(pkiDir, "signer.key"), "--cert", filepath.Join(pkiDir, "signer.pem"), p).CombinedOutput(); err != nil {
		d.t.Fatalf("cmlsign config: %v\n%s", err, out)
	}
	return p
}

// exec runs a shell command in a container and returns stdout and the exit
// status.
func (d *daemon) exec(name, script string) (string, int) {
	d.t.Helper()
	out, errOut, code := d.ctl("exec", name, "--", "sh", "-c", script)
	if strings.Contains(errOut, "cmlctl:") {
		d.t.Fatalf("exec in %s: %s", name, errOut)
	}
	return out, code
}

// state returns a container's state name.
func (d *daemon) state(name string) string {
	d.t.Helper()
	out := d.must("state", name)
	f := strings.Fields(out)
	if len(f) < 3 {
		d.t.Fatalf("state output %q", out)
	}
	return f[2]
}

// waitState polls until name reaches want or the timeout ends.
func (d *daemon) waitState(name, want string, timeout time.Duration) {
	d.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if d.state(name) == want {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	d.t.Fatalf("container %s is %s, want %s after %v", name, d.state(name), want, timeout)
}

// auditLines returns the audit log's lines.
func (d *daemon) auditLines() []string {
	f, err := os.Open(filepath.Join(d.stateDir, "audit.log"))
	if err != nil {
		d.t.Fatal(err)
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	return lines
}

// mountsUnder lists mounts below dir in the host's mount namespace and in
// cmld's own (while it runs).
func mountsUnder(t *testing.T, dir string) []string {
	mps, err := rootfs.MountsUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range daemonsRunning() {
		in, _ := rootfs.MountsUnderIn(strconv.Itoa(d), dir)
		mps = append(mps, in...)
	}
	return mps
}

// daemonsRunning lists the pids of the cmld processes of this test run:
// each has a mount namespace of its own.
func daemonsRunning() []int {
	want := filepath.Join(binDir, "cmld")
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if exe, err := os.Readlink("/proc/" + e.Name() + "/exe"); err == nil && exe == want {
			out = append(out, pid)
		}
	}
	return out
}
