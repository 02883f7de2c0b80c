package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/testutil"
)

// collectorPKI makes a CA and a server certificate for 127.0.0.1 under it.
func collectorPKI(t *testing.T, dir, name string) (ca, cert, key string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name + " CA"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	caCert, _ := x509.ParseCertificate(caDER)
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, caCert, k.Public(), caKey)
	kder, _ := x509.MarshalPKCS8PrivateKey(k)
	ca, cert, key = filepath.Join(dir, name+"-ca.pem"), filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644)
	os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600)
	return
}

// rsyslog is a real collector the test runs itself (never the system's):
// TLS with client certificates checked against clientCA, octet-counted
// framing, each message's structured data and text into out.
type rsyslog struct {
	t   *testing.T
	dir string
	out string
	cmd *exec.Cmd
}

func startRsyslog(t *testing.T, dir string, port int, clientCA, cert, key string) *rsyslog {
	t.Helper()
	os.MkdirAll(dir, 0o700)
	r := &rsyslog{t: t, dir: dir, out: filepath.Join(dir, "out.log")}
	conf := fmt.Sprintf(`global(workDirectory=%q
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile=%q
  DefaultNetstreamDriverCertFile=%q
  DefaultNetstreamDriverKeyFile=%q)
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" port="%d" address="127.0.0.1")
template(name="m" type="string" string="%%structured-data%% %%msg%%\n")
action(type="omfile" file=%q template="m" flushOnTXEnd="on" asyncWriting="off")
`, dir, clientCA, cert, key, port, r.out)
	cf := filepath.Join(dir, "rsyslog.conf")
	os.WriteFile(cf, []byte(conf), 0o600)
	r.cmd = exec.Command("rsyslogd", "-n", "-f", cf, "-i", filepath.Join(dir, "pid"))
	r.cmd.Stdout, r.cmd.Stderr = os.Stderr, os.Stderr
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.kill)
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("tcp", fmt.Sprint("127.0.0.1:", port)); err == nil {
			c.Close()
			return r
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("rsyslogd does not listen")
	return nil
}

func (r *rsyslog) kill() {
	if r.cmd.ProcessState == nil {
		r.cmd.Process.Signal(syscall.SIGKILL)
		r.cmd.Wait()
	}
}

var seqRe = regexp.MustCompile(`seq="(\d+)"`)

// seqs returns the sequence numbers the collector holds.
func (r *rsyslog) seqs() map[int]bool {
	b, _ := os.ReadFile(r.out)
	got := map[int]bool{}
	for _, m := range seqRe.FindAllSubmatch(b, -1) {
		n, _ := strconv.Atoi(string(m[1]))
		got[n] = true
	}
	return got
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// lastSeq is the trail's highest sequence number.
func (d *daemon) lastSeq() int {
	ls := d.auditLines()
	re := regexp.MustCompile(`"seq":(\d+)`)
	for i := len(ls) - 1; i >= 0; i-- {
		if m := re.FindStringSubmatch(ls[i]); m != nil {
			n, _ := strconv.Atoi(m[1])
			return n
		}
	}
	return 0
}

// TestAuditForwarding: the trail goes to a real rsyslog over mutual TLS
// with the device's TPM-held key: a collector down at the start gets
// everything once it is up; one killed mid-stream loses nothing; a
// collector whose certificate does not chain to the configured CA is
// refused, and that is audited on the device. Checkpoints go too.
func TestAuditForwarding(t *testing.T) {
	testutil.RequireTool(t, "rsyslogd", "openssl")
	if _, err := os.Stat("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so"); err != nil {
		t.Skip("rsyslog-gnutls is not installed")
	}
	d := startDaemon(t)
	fleet := filepath.Join(d.root, "fleet")
	if out, err := exec.Command(filepath.Join(binDir, "cmlsign"), "pki", "init", "--dir", fleet).CombinedOutput(); err != nil {
		t.Fatalf("fleet pki: %v %s", err, out)
	}
	d.provisionIdentity(fleet)
	ca, cert, key := collectorPKI(t, d.root, "collector")
	port := freePort(t)
	d.restartWithDevice(fmt.Sprintf("audit {\n  collector: \"127.0.0.1:%d\"\n  collector_ca_file: %q\n  checkpoint_every: 20\n}\n", port, ca))
	d.installGuestOS()
	for i := 0; i < 5; i++ {
		d.create(fmt.Sprint("f", i), "")
	}
	waitFor(t, 5*time.Second, func() bool { return d.hasAudit("audit.forward", "failure", "records are kept") }, "audit record of the unreachable collector")

	// The collector comes up: everything so far arrives.
	col := startRsyslog(t, filepath.Join(d.root, "rsyslog"), port, filepath.Join(fleet, "root-ca.pem"), cert, key)
	complete := func(r *rsyslog, what string) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		var missing []int
		for time.Now().Before(deadline) {
			got, last := r.seqs(), d.lastSeq()
			missing = missing[:0]
			for s := 1; s <= last; s++ {
				if !got[s] {
					missing = append(missing, s)
				}
			}
			if len(missing) == 0 {
				return
			}
			time.Sleep(300 * time.Millisecond)
		}
		t.Errorf("%s: the collector lacks records %v", what, missing)
	}
	complete(col, "collector down at the start")

	// Killed mid-stream while records keep coming: none lost.
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 30; i++ {
			d.ctl("state", "f0")
			d.ctl("start", "nosuch") // an audited refusal each time
		}
	}()
	time.Sleep(200 * time.Millisecond)
	col.kill()
	<-done
	col = startRsyslog(t, filepath.Join(d.root, "rsyslog"), port, filepath.Join(fleet, "root-ca.pem"), cert, key)
	complete(col, "collector killed mid-stream")
	if b, _ := os.ReadFile(col.out); !strings.Contains(string(b), "cml audit ") {
		t.Errorf("no checkpoint reached the collector")
	}

	// A rogue collector on the same address, with a certificate from
	// another CA: refused, nothing sent to it, audited on the device.
	col.kill()
	_, rcert, rkey := collectorPKI(t, d.root, "rogue")
	rogue := startRsyslog(t, filepath.Join(d.root, "rogue"), port, filepath.Join(fleet, "root-ca.pem"), rcert, rkey)
	before := len(d.auditLines())
	d.ctl("start", "nosuch")
	waitFor(t, 40*time.Second, func() bool {
		for _, l := range d.auditLines()[before:] {
			if strings.Contains(l, `"operation":"audit.forward"`) && strings.Contains(l, "certificate") {
				return true
			}
		}
		return false
	}, "audit record of the refused rogue collector")
	if n := len(rogue.seqs()); n != 0 {
		t.Errorf("the rogue collector received %d records", n)
	}
}
