package e2e

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/guestos"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/testutil"
)

// writeDeviceConfig writes device.conf and restarts the daemon on it.
func (d *daemon) restartWithDevice(text string) {
	d.t.Helper()
	if err := os.WriteFile(filepath.Join(d.stateDir, "device.conf"), []byte(d.deviceConf(text)), 0o600); err != nil {
		d.t.Fatal(err)
	}
	d.cmd.Process.Signal(os.Interrupt)
	d.cmd.Wait()
	d.start()
}

func (d *daemon) hasAudit(op, outcome, contains string) bool {
	for _, l := range d.auditLines() {
		if strings.Contains(l, `"operation":"`+op+`"`) && strings.Contains(l, `"outcome":"`+outcome+`"`) && strings.Contains(l, contains) {
			return true
		}
	}
	return false
}

func TestSignedConfigs(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	p := filepath.Join(d.root, "plain.conf")
	os.WriteFile(p, []byte("name: \"plain\"\nguest_os: \"busybox\"\n"), 0o644)
	before := snapshot(t, d.stateDir)
	d.refuse("config is not signed", "create", p)
	if snapshot(t, d.stateDir) != before {
		t.Error("refused create changed the state directory")
	}
	d.create("signed", "")
	if out := d.must("list"); !strings.Contains(out, "SIGNED") {
		t.Errorf("list does not show the trust level:\n%s", out)
	}
	// A signed config edited afterwards: signature mismatch.
	q := d.signedConfig("edited", "name: \"edited\"\nguest_os: \"busybox\"\n")
	os.WriteFile(q, []byte("name: \"edited\"\nguest_os: \"busybox\"\nuserns: false\n"), 0o644)
	d.refuse("does not match the signed file", "create", q)
	d.refuse("config is not signed", "update-config", "signed", p)

	// The stored config is checked again before each start: editing it on
	// disk (an attacker with write access to the state) stops the start.
	var dir string
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "containers"))
	for _, e := range ents {
		dir = filepath.Join(d.stateDir, "containers", e.Name())
	}
	cfg := filepath.Join(dir, "config", "config.conf") // through the link to the current version
	orig := mustRead(t, cfg)
	os.WriteFile(cfg, append(orig, []byte("capabilities_keep: \"CAP_NET_RAW\"\n")...), 0o600)
	d.refuse("does not match the signed file", "start", "signed")
	os.WriteFile(cfg, orig, 0o600)
	d.must("start", "signed")
	d.must("stop", "signed")

	// Development devices may allow unsigned configs.
	d.restartWithDevice("signed_configs: false\n")
	d.must("create", p)
	if out := d.must("state", "plain"); !strings.Contains(out, "UNSIGNED") {
		t.Errorf("state of an unsigned config: %q", out)
	}
	// Turning signed_configs back on stops the unsigned container's start.
	d.restartWithDevice("signed_configs: true\n")
	d.refuse("config is not signed", "start", "plain")
}

func TestImageVerifiedBeforeEveryStart(t *testing.T) {
	d := startDaemon(t)
	if strings.Contains(d.log.String(), "dm-verity=true") {
		t.Skip("this host maps images through dm-verity: blocks are checked as read (guestos.TestDMVerityRefusesTamperedBlocks), not in full before start")
	}
	d.installGuestOS()
	d.create("v", "")
	d.must("start", "v")
	d.must("stop", "v")
	img := filepath.Join(d.stateDir, "guestos", "busybox", "1", "root.img")
	orig := mustRead(t, img)
	bad := append([]byte(nil), orig...)
	bad[5*4096+100] ^= 0x40
	os.Chmod(img, 0o600)
	os.WriteFile(img, bad, 0o400)
	// Integrity violations are pushed as alerts on the event stream.
	var events bytes.Buffer
	ev := exec.Command(filepath.Join(binDir, "cmlctl"), "--socket", d.socket, "events")
	ev.Stdout = &events
	ev.Start()
	time.Sleep(200 * time.Millisecond)
	msg := d.refuse("data blocks 5 ", "start", "v")
	time.Sleep(300 * time.Millisecond)
	ev.Process.Signal(os.Interrupt)
	ev.Wait()
	if !strings.Contains(events.String(), "ALERT") || !strings.Contains(events.String(), "container.verify") {
		t.Errorf("no alert on the event stream:\n%s", events.String())
	}
	if st := d.state("v"); st != "FAILED" {
		t.Errorf("after a failed check the container is %s", st)
	}
	if !d.hasAudit("container.verify", "failure", "data blocks 5") {
		t.Errorf("no container.verify audit event for %q", msg)
	}
	os.WriteFile(img, orig, 0o400)
	d.must("start", "v")
	d.must("stop", "v")
}

func TestRevocationAndOwnerCAs(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("r", "")
	owner := testutil.NewPKI(t, "ed25519", "owner")

	// Owner CA: configs signed under it are LOCALLY_SIGNED once registered.
	p := filepath.Join(d.root, "local.conf")
	os.WriteFile(p, []byte("name: \"local\"\nguest_os: \"busybox\"\n"), 0o644)
	owner.SignFile(t, p)
	d.refuse("does not chain to a trusted CA", "create", p)
	d.must("ca", "register", filepath.Join(owner.Dir, "root-ca.pem"))
	d.must("create", p)
	if out := d.must("state", "local"); !strings.Contains(out, "LOCALLY_SIGNED") {
		t.Errorf("state = %q", out)
	}
	out := d.must("ca", "list")
	if !strings.Contains(out, "vendor") || !strings.Contains(out, "owner") {
		t.Errorf("ca list:\n%s", out)
	}
	// A guest OS signed under the owner CA needs locally_signed_images.
	g := copyGuestOS(t, d)
	editManifest(t, g, `name: "busybox"`, `name: "ownerbox"`)
	owner.SignFile(t, filepath.Join(g, "guestos.conf"))
	d.refuse("locally signed images are off", "guestos", "install", g)
	d.restartWithDevice("locally_signed_images: true\n")
	if out := d.must("guestos", "install", g); !strings.Contains(out, "LOCALLY_SIGNED") {
		t.Errorf("owner-signed guest OS: %q", out)
	}
	d.restartWithDevice("locally_signed_images: false\n")
	// Vendor CAs are not changeable through the API.
	vendorFP := sign.Fingerprint(mustCert(t, filepath.Join(pkiDir, "root-ca.pem")))
	d.refuse("vendor CA", "ca", "remove", vendorFP[:16])
	// Removing the owner CA stops its containers from starting.
	d.must("ca", "remove", sign.Fingerprint(owner.Root)[:16])
	d.refuse("does not chain to a trusted CA", "start", "local")

	// Revoking the vendor signer: installed guest OS and configs it signed
	// no longer start; a new install is refused.
	rootKey, _ := sign.ParsePrivateKey(mustRead(t, filepath.Join(pkiDir, "root-ca.key")))
	signer := mustCert(t, filepath.Join(pkiDir, "signer.pem"))
	crl, err := sign.RevocationList(mustCert(t, filepath.Join(pkiDir, "root-ca.pem")), rootKey, []*x509.Certificate{signer}, time.Now().UnixNano(), time.Now().Add(-time.Minute), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	crlPath := filepath.Join(d.root, "crl.pem")
	os.WriteFile(crlPath, crl, 0o644)
	d.must("ca", "crl", crlPath)
	d.refuse("revoked", "start", "r")
	d.must("remove", "r")
	d.must("remove", "local")
	d.must("guestos", "remove", "busybox", "1")
	d.refuse("revoked", "guestos", "install", guestOSDir)

	// CRL poisoning (item 5): a CRL from a CA the device does not trust is
	// refused; the stored CRL is listed; removing it is audited and
	// un-revokes the signer.
	stranger := testutil.NewPKI(t, "ecdsa-p256", "stranger")
	bogus, _ := sign.RevocationList(stranger.Root, stranger.RootKey, nil, 1, time.Now(), time.Hour)
	bogusPath := filepath.Join(d.root, "bogus-crl.pem")
	os.WriteFile(bogusPath, bogus, 0o644)
	d.refuse("not a trusted CA", "ca", "crl", "load", bogusPath)
	if out := d.must("ca", "crl", "list"); strings.Count(out, "\n") != 2 || !strings.Contains(out, "CML development") {
		t.Errorf("ca crl list:\n%s", out)
	}
	d.must("ca", "crl", "remove", mustCert(t, filepath.Join(pkiDir, "root-ca.pem")).Subject.String())
	if !d.hasAudit("control.CRLRemove", "success", "") {
		t.Error("CRL removal not audited")
	}
	d.must("guestos", "install", guestOSDir)
}

func mustCert(t *testing.T, p string) *x509.Certificate {
	cs, err := sign.ParseCertificates(mustRead(t, p))
	if err != nil {
		t.Fatal(err)
	}
	return cs[0]
}

func TestUpdateKeepsOldVersionWhileUsedAndRefusesRollback(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("pinned", "guestos_version: 1\n")
	d.create("floating", "")
	d.must("start", "floating")
	v2 := filepath.Join(d.root, "v2")
	if err := buildGuestOS(v2, "busybox", 2); err != nil {
		t.Fatal(err)
	}
	d.must("guestos", "install", v2)
	out := d.must("guestos", "list")
	if !strings.Contains(out, "busybox  1") && !strings.Contains(out, "busybox 1") {
		t.Errorf("version 1 removed while used:\n%s", out)
	}
	// The running container stays on 1 until restarted; then it takes 2.
	d.must("stop", "floating")
	d.must("start", "floating")
	if f := strings.Fields(d.must("list")); !strings.Contains(strings.Join(f, " "), "floating") {
		t.Fatal("floating missing from list")
	}
	var st struct{ GuestosVersion string }
	if err := json.Unmarshal([]byte(d.must("state", "floating", "-o", "json")), &st); err != nil || st.GuestosVersion != "2" {
		t.Errorf("floating container did not move to version 2: %+v %v", st, err)
	}
	d.must("stop", "floating")
	// Pinned keeps 1 alive; dropping the pin lets the store collect it.
	d.must("update-config", "pinned", d.signedConfig("pinned2", "name: \"pinned\"\nguest_os: \"busybox\"\n"))
	if out := d.must("guestos", "list"); strings.Count(out, "busybox") != 1 {
		t.Errorf("unused version 1 kept after update:\n%s", out)
	}
	if !d.hasAudit("guestos.collect", "success", "busybox 1") {
		t.Error("collection of version 1 not audited")
	}
	// Installing 1 again is a downgrade, refused even though 1 is gone.
	before := snapshot(t, d.stateDir)
	d.refuse("rollback protection", "guestos", "install", guestOSDir)
	d.crash()
	d.start()
	d.refuse("rollback protection", "guestos", "install", guestOSDir)
	if snapshot(t, d.stateDir) != before {
		t.Error("refused downgrade changed the state directory")
	}
}

// TestKillDuringInstall kills cmld with SIGKILL while it copies and
// verifies a large guest OS; after a restart nothing half-installed is
// visible, nothing staged is left, and the install succeeds.
func TestKillDuringInstall(t *testing.T) {
	testutil.RequireRoot(t)
	big := filepath.Join(filepath.Dir(binDir), "big-guestos") // signed by this run's PKI
	if _, err := os.Stat(filepath.Join(big, "guestos.conf")); err != nil {
		if err := buildBigGuestOS(big, 256); err != nil {
			t.Fatal(err)
		}
	}
	d := startDaemon(t)
	done := make(chan struct{})
	go func() {
		d.ctl("guestos", "install", big)
		close(done)
	}()
	store := filepath.Join(d.stateDir, "guestos")
	deadline := time.Now().Add(20 * time.Second)
	staged := false
	for !staged && time.Now().Before(deadline) {
		ents, _ := os.ReadDir(store)
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), ".staging-") {
				staged = true
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !staged {
		t.Fatal("install never staged")
	}
	time.Sleep(100 * time.Millisecond)
	d.crash()
	<-done
	d.start()
	if out := d.must("guestos", "list"); strings.Contains(out, "big") {
		t.Fatalf("half-installed guest OS visible after the crash:\n%s", out)
	}
	ents, _ := os.ReadDir(store)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".staging-") || e.Name() == "big" {
			t.Errorf("left after the crash: %s", e.Name())
		}
	}
	d.must("guestos", "install", big)
}

// buildBigGuestOS builds a signed guest OS named big with mb MiB of random
// data in its image.
func buildBigGuestOS(out string, mb int) error {
	root, err := os.MkdirTemp("", "cml-big-root-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(root)
	f, err := os.Create(filepath.Join(root, "blob"))
	if err != nil {
		return err
	}
	rnd, _ := os.Open("/dev/urandom")
	buf := make([]byte, 1<<20)
	for i := 0; i < mb; i++ {
		rnd.Read(buf)
		f.Write(buf)
	}
	rnd.Close()
	f.Close()
	os.MkdirAll(filepath.Join(root, "sbin"), 0o755)
	return runCmd(filepath.Join(binDir, "cmlsign"), "guestos", "build", "--rootfs", root, "--all-root", "--name", "big", "--version", "1",
		"--key", filepath.Join(pkiDir, "signer.key"), "--cert", filepath.Join(pkiDir, "signer.pem"), "--out", out)
}

// TestHTTPSInstall installs from an HTTPS server whose certificate chains
// to the configured update CA, through a connection cut in the middle of
// the image, and resumes.
func TestHTTPSInstall(t *testing.T) {
	d := startDaemon(t)
	var cut atomic.Bool
	cut.Store(true)
	var ranges atomic.Int32
	files := http.FileServer(http.Dir(guestOSDir))
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") != "" {
			ranges.Add(1)
		}
		if strings.HasSuffix(r.URL.Path, "root.img") && cut.Swap(false) {
			// Send the first 64 KiB, then drop the connection.
			b := mustRead(t, filepath.Join(guestOSDir, "root.img"))
			w.Header().Set("Content-Length", fmt.Sprint(len(b)))
			w.WriteHeader(http.StatusOK)
			w.Write(b[:64<<10])
			w.(http.Flusher).Flush()
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
			return
		}
		files.ServeHTTP(w, r)
	}))
	srv.Listener.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv.Listener = l
	srv.StartTLS()
	defer srv.Close()
	ca := filepath.Join(d.root, "update-ca.pem")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644)

	url := srv.URL + "/"
	d.refuse("no update CA configured", "guestos", "install", url)
	d.restartWithDevice(fmt.Sprintf("update_ca_file: %q\n", ca))
	d.refuse("only downloaded over https", "guestos", "install", strings.Replace(url, "https://", "http://", 1))
	d.refuse("interrupted", "guestos", "install", url)
	if out := d.must("guestos", "list"); strings.Contains(out, "busybox") {
		t.Fatal("interrupted download installed something")
	}
	out, errOut, code := d.ctl("guestos", "install", "--progress", url)
	if code != 0 {
		t.Fatalf("resumed install: %s", errOut)
	}
	if !strings.Contains(out, "installed guestos busybox 1") || !strings.Contains(errOut, "download") {
		t.Errorf("install output %q, progress %q", out, errOut)
	}
	if ranges.Load() == 0 {
		t.Error("the second attempt did not resume with a range request")
	}
	// A server whose certificate does not chain to the update CA.
	d.restartWithDevice(fmt.Sprintf("update_ca_file: %q\n", filepath.Join(pkiDir, "root-ca.pem")))
	d.refuse("certificate", "guestos", "install", url)
}

func runCmd(name string, args ...string) error {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v\n%s", name, err, out)
	}
	return nil
}

// On a host with device-mapper the image is not hashed in full before a
// start: dm-verity checks each block as the kernel reads it. A block
// changed on disk (here the erofs superblock) stops the next start with
// an integrity error. Runs in the QEMU lane (docs/vm-tests.md).
func TestDMVerityStartRefusesTamperedImage(t *testing.T) {
	if !guestos.DMVerityAvailable() {
		t.Skip("no device-mapper here: this test runs in the QEMU lane on Debian's kernel")
	}
	d := startDaemon(t)
	d.installGuestOS()
	d.create("v", "")
	d.must("start", "v")
	d.must("stop", "v")
	img := filepath.Join(d.stateDir, "guestos", "busybox", "1", "root.img")
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	f.ReadAt(b, 1024+16)
	b[0] ^= 0xff
	f.WriteAt(b, 1024+16)
	f.Close()
	d.refuse("do not match the signed hash tree", "start", "v")
}
