package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/testutil"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  string
}

func newTestCA(t *testing.T, dir, name string) *testCA {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	c, _ := x509.ParseCertificate(der)
	p := filepath.Join(dir, name+".pem")
	os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	return &testCA{c, k, p}
}

// client issues a client certificate; it returns the cert and key paths.
func (ca *testCA) client(t *testing.T, dir, cn string, serial int64, notAfter time.Time) (string, string) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-2 * time.Hour), NotAfter: notAfter,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, k.Public(), ca.key)
	kd, _ := x509.MarshalPKCS8PrivateKey(k)
	cp, kp := filepath.Join(dir, cn+".pem"), filepath.Join(dir, cn+".key")
	os.WriteFile(cp, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(kp, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}), 0o600)
	return cp, kp
}

// remoteDevice is a daemon with a provisioned device identity, an owner
// CA registered, and the remote API listening.
type remoteDevice struct {
	*daemon
	owner *testCA
	fleet string
	addr  string
}

func newRemoteDevice(t *testing.T, remoteFields string) *remoteDevice {
	d := startDaemon(t)
	fleet := filepath.Join(d.root, "fleet")
	if out, err := exec.Command(filepath.Join(binDir, "cmlsign"), "pki", "init", "--dir", fleet).CombinedOutput(); err != nil {
		t.Fatalf("fleet pki: %v %s", err, out)
	}
	d.provisionIdentity(fleet)
	owner := newTestCA(t, d.root, "owner-ca")
	d.must("ca", "register", owner.pem)
	port := freePort(t)
	d.restartWithDevice(fmt.Sprintf("remote { listen: \"127.0.0.1:%d\" %s }\n", port, remoteFields))
	return &remoteDevice{daemon: d, owner: owner, fleet: fleet, addr: fmt.Sprint("127.0.0.1:", port)}
}

// remote runs cmlctl against the remote API with a client certificate
// (args carry --key or the PKCS#11 flags), in env's environment.
func (r *remoteDevice) remote(env []string, cert string, args ...string) (string, int) {
	cmd := exec.Command(filepath.Join(binDir, "cmlctl"), append([]string{"--remote", r.addr, "--cert", cert, "--ca", filepath.Join(r.fleet, "root-ca.pem")}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	}
	return string(out), code
}

// TestRemoteAPI: the control API over mutual TLS with the TPM-held device
// key: an administrator's certificate under the owner CA works with the
// same commands; a rogue CA, a revoked or expired certificate, one that
// maps to no account, a client without a certificate, TLS 1.1 and CBC
// suites are refused; the server presents the device certificate; remote
// calls are audited with the certificate's subject.
func TestRemoteAPI(t *testing.T) {
	testutil.RequireTool(t, "openssl")
	rd := newRemoteDevice(t, "")
	d, owner, addr := rd.daemon, rd.owner, rd.addr
	alice, aliceKey := owner.client(t, d.root, "alice", 10, time.Now().Add(24*time.Hour))
	bob, bobKey := owner.client(t, d.root, "bob", 11, time.Now().Add(24*time.Hour))
	old, oldKey := owner.client(t, d.root, "old", 12, time.Now().Add(-time.Hour))
	gone, goneKey := owner.client(t, d.root, "gone", 13, time.Now().Add(24*time.Hour))
	rogueCA := newTestCA(t, d.root, "rogue-ca")
	rogue, rogueKey := rogueCA.client(t, d.root, "alice-rogue", 14, time.Now().Add(24*time.Hour))
	crl, _ := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(1), ThisUpdate: time.Now().Add(-time.Minute), NextUpdate: time.Now().Add(time.Hour),
		RevokedCertificateEntries: []x509.RevocationListEntry{{SerialNumber: big.NewInt(13), RevocationTime: time.Now().Add(-time.Minute)}}}, owner.cert, owner.key)
	crlPath := filepath.Join(d.root, "owner.crl")
	os.WriteFile(crlPath, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: crl}), 0o644)
	d.must("ca", "crl", "load", crlPath)
	d.must("user", "add", "alice", "--role", "administrator", "--cert-name", "alice", "--cert-name", "old", "--cert-name", "gone", "--cert-name", "alice-rogue")
	remote := func(cert, key string, args ...string) (string, int) {
		return rd.remote(nil, cert, append([]string{"--key", key}, args...)...)
	}
	if out, code := remote(alice, aliceKey, "whoami"); code != 0 || !strings.Contains(out, "alice roles=administrator") {
		t.Fatalf("remote whoami as alice: %d %s", code, out)
	}
	// The same from a config file (paths relative to it); a misspelt
	// setting is a one-line error.
	conf := filepath.Join(d.root, "cmlctl.conf")
	os.WriteFile(conf, []byte("# alice's device\nremote = "+addr+"\ncert = alice.pem\nkey = alice.key\nca = fleet/root-ca.pem\n"), 0o600)
	if out, err := exec.Command(filepath.Join(binDir, "cmlctl"), "--config", conf, "whoami").CombinedOutput(); err != nil || !strings.Contains(string(out), "alice roles=administrator") {
		t.Errorf("remote whoami from a config file: %v %s", err, out)
	}
	os.WriteFile(conf, []byte("remtoe = "+addr+"\n"), 0o600)
	if out, err := exec.Command(filepath.Join(binDir, "cmlctl"), "--config", conf, "whoami").CombinedOutput(); err == nil || !strings.Contains(string(out), `"remtoe" is not a setting`) || strings.Count(strings.TrimSpace(string(out)), "\n") != 0 {
		t.Errorf("a misspelt setting: %v %s", err, out)
	}
	d.installGuestOS()
	d.create("r", "")
	if out, code := remote(alice, aliceKey, "start", "r"); code != 0 {
		t.Errorf("remote start: %d %s", code, out)
	}
	if out, code := remote(alice, aliceKey, "list"); code != 0 || !strings.Contains(out, "RUNNING") {
		t.Errorf("remote list: %d %s", code, out)
	}
	if !d.hasAudit("control.Start", "success", `"certificate":"CN=alice"`) {
		t.Errorf("the remote call is not audited with the certificate's subject")
	}
	for name, c := range map[string][2]string{"rogue CA": {rogue, rogueKey}, "expired": {old, oldKey}, "revoked": {gone, goneKey}} {
		if out, code := remote(c[0], c[1], "list"); code == 0 {
			t.Errorf("%s certificate accepted: %s", name, out)
		}
	}
	if out, code := remote(bob, bobKey, "list"); code == 0 || !strings.Contains(out, "no account") {
		t.Errorf("a certificate mapped to no account: %d %s", code, out)
	}
	// openssl as an independent client: old protocols, CBC suites and a
	// missing client certificate are refused; the server certificate is
	// the device's.
	sclient := func(args ...string) (string, error) {
		cmd := exec.Command("openssl", append([]string{"s_client", "-connect", addr, "-servername", "device"}, args...)...)
		cmd.Stdin = strings.NewReader("")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	for _, args := range [][]string{{"-tls1_1", "-cert", alice, "-key", aliceKey}, {"-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA", "-cert", alice, "-key", aliceKey}, {"-tls1_2", "-cipher", "AES128-GCM-SHA256", "-cert", alice, "-key", aliceKey}} {
		if out, err := sclient(args...); err == nil && strings.Contains(out, "Cipher is") && !strings.Contains(out, "Cipher is (NONE)") {
			t.Errorf("openssl %v was accepted:\n%s", args, out)
		}
	}
	if out, err := sclient("-tls1_2"); err == nil && strings.Contains(out, "Verify return code") && !strings.Contains(out, "alert") && !strings.Contains(out, "handshake failure") {
		t.Errorf("a TLS 1.2 client without a certificate was accepted:\n%s", out)
	}
	out, _ := sclient("-tls1_3", "-cert", alice, "-key", aliceKey, "-showcerts")
	dev, _ := os.ReadFile(filepath.Join(d.stateDir, "identity", "tls.pem"))
	blk, _ := pem.Decode(dev)
	if blk == nil || !strings.Contains(strings.ReplaceAll(out, "\n", ""), strings.ReplaceAll(string(pem.EncodeToMemory(blk)), "\n", "")) {
		t.Errorf("the server does not present the device certificate")
	}
	// The device's TLS key is in the TPM: no private key on its disk
	// outside the TPM's own state.
	filepath.WalkDir(d.stateDir, func(p string, e os.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() && !strings.Contains(p, "/tpm/") {
			if b, _ := os.ReadFile(p); strings.Contains(string(b), "PRIVATE KEY") {
				t.Errorf("a private key on disk: %s", p)
			}
		}
		return nil
	})
	if out, code := remote(alice, aliceKey, "stop", "r"); code != 0 {
		t.Errorf("remote stop: %d %s", code, out)
	}
}

// TestRemoteMultiFactorAndTokenKey: under the remote_mfa policy a
// certificate alone gets nothing; certificate and password log in, to a
// session bound to that certificate (its token with another certificate
// is nothing, and one account's password with another's certificate is
// refused); a client key generated on a PKCS#11 token (SoftHSM2) and
// certified by the owner CA through openssl authenticates with the same
// commands, and a wrong token PIN gets nothing (CR 1.1(2), FIA_UAU.5,
// FTP_ITC.1).
func TestRemoteMultiFactorAndTokenKey(t *testing.T) {
	testutil.RequireTool(t, "openssl", "softhsm2-util")
	module := "/usr/lib/softhsm/libsofthsm2.so"
	if _, err := os.Stat(module); err != nil {
		t.Skip("SoftHSM2 module not installed (apt-get install softhsm2)")
	}
	rd := newRemoteDevice(t, "")
	d := rd.daemon
	alice, aliceKey := rd.owner.client(t, d.root, "alice", 20, time.Now().Add(24*time.Hour))
	bob, bobKey := rd.owner.client(t, d.root, "bob", 21, time.Now().Add(24*time.Hour))
	d.must("user", "add", "alice", "--role", "administrator", "--cert-name", "alice")
	d.must("user", "add", "bob", "--role", "auditor", "--cert-name", "bob")
	d.must("user", "policy", "--remote-mfa=true")
	const initial, chosen = "Initial-Passw0rd", "Chosen-By-0wner1"
	f := secretFiles(t, filepath.Join(d.root, "secrets"), 0, initial, chosen, "4711", "0000")
	sessA, sessB := filepath.Join(d.root, "alice.session"), filepath.Join(d.root, "bob.session")
	if out, code := rd.remote(nil, alice, "--key", aliceKey, "--session-file", sessA, "whoami"); code == 0 || !strings.Contains(out, "remote_mfa") {
		t.Errorf("a certificate alone under remote_mfa: %d %s", code, out)
	}
	d.must("user", "passwd", "alice", "--new-password-file", f[initial])
	if out, code := rd.remote(nil, alice, "--key", aliceKey, "--session-file", sessA, "login", "--password-file", f[initial], "--new-password-file", f[chosen]); code != 0 || !strings.Contains(out, "logged in as alice") {
		t.Fatalf("remote login with certificate and password: %d %s", code, out)
	}
	if out, code := rd.remote(nil, alice, "--key", aliceKey, "--session-file", sessA, "list"); code != 0 {
		t.Errorf("a call in the remote session: %d %s", code, out)
	}
	if out, code := rd.remote(nil, bob, "--key", bobKey, "--session-file", sessA, "whoami"); code == 0 || !strings.Contains(out, "no such session") {
		t.Errorf("alice's session token with bob's certificate: %d %s", code, out)
	}
	if out, code := rd.remote(nil, bob, "--key", bobKey, "--session-file", sessB, "login", "alice", "--password-file", f[chosen]); code == 0 || !strings.Contains(out, "login failed") {
		t.Errorf("alice's password with bob's certificate: %d %s", code, out)
	}
	if !d.hasAudit("control.Login", "success", `"certificate":"CN=alice"`) || !d.hasAudit("control.Login", "failure", "may not log in as certificate bob") {
		t.Error("remote logins are not audited with the certificate")
	}

	// A client key on a PKCS#11 token.
	d.must("user", "policy", "--remote-mfa=false")
	hsm := filepath.Join(d.root, "softhsm")
	os.MkdirAll(filepath.Join(hsm, "tokens"), 0o700)
	conf := filepath.Join(hsm, "softhsm2.conf")
	os.WriteFile(conf, []byte("directories.tokendir = "+filepath.Join(hsm, "tokens")+"\nobjectstore.backend = file\n"), 0o600)
	env := []string{"SOFTHSM2_CONF=" + conf}
	init := exec.Command("softhsm2-util", "--init-token", "--free", "--label", "operator", "--pin", "4711", "--so-pin", "12345678")
	init.Env = append(os.Environ(), env...)
	if out, err := init.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util: %v %s", err, out)
	}
	p11 := func(pin string) []string {
		return []string{"--pkcs11-module", module, "--token-label", "operator", "--key-label", "carol-remote", "--pkcs11-pin-file", f[pin]}
	}
	csrPath := filepath.Join(d.root, "carol.csr")
	csr := exec.Command(filepath.Join(binDir, "cmlctl"), append(p11("4711"), "client", "csr", "--cn", "carol", "--out", csrPath)...)
	csr.Env = append(os.Environ(), env...)
	if out, err := csr.CombinedOutput(); err != nil {
		t.Fatalf("client csr: %v %s", err, out)
	}
	caKey := filepath.Join(d.root, "owner-ca.key")
	kd, _ := x509.MarshalPKCS8PrivateKey(rd.owner.key)
	os.WriteFile(caKey, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}), 0o600)
	ext := filepath.Join(d.root, "client.ext")
	os.WriteFile(ext, []byte("extendedKeyUsage = clientAuth\nkeyUsage = digitalSignature\n"), 0o644)
	carol := filepath.Join(d.root, "carol.pem")
	if out, err := exec.Command("openssl", "x509", "-req", "-in", csrPath, "-CA", rd.owner.pem, "-CAkey", caKey, "-set_serial", "30", "-days", "1",
		"-extfile", ext, "-out", carol).CombinedOutput(); err != nil {
		t.Fatalf("openssl x509 -req: %v %s", err, out)
	}
	d.must("user", "add", "carol", "--role", "administrator", "--cert-name", "carol")
	if out, code := rd.remote(env, carol, append(p11("4711"), "whoami")...); code != 0 || !strings.Contains(out, "carol roles=administrator") {
		t.Errorf("remote whoami with the key on the token: %d %s", code, out)
	}
	if out, code := rd.remote(env, carol, append(p11("0000"), "whoami")...); code == 0 || !strings.Contains(out, "refused the PIN") {
		t.Errorf("a wrong token PIN: %d %s", code, out)
	}
	// The certificate of another key does not pair with the token's.
	if out, code := rd.remote(env, alice, append(p11("4711"), "whoami")...); code == 0 || !strings.Contains(out, "not the certificate of key") {
		t.Errorf("another key's certificate with the token's key: %d %s", code, out)
	}
}

// TestRemoteConnectionLimits: one address cannot take every connection
// slot (CR 7.1). An attacker at 127.0.0.2 opens TCP connections and never
// starts TLS: beyond max_connections_per_host they are closed at once,
// and an administrator at 127.0.0.1 is served within seconds (without
// the per-address limit the attacker's connections fill
// max_connections and the administrator waits for the 10 s handshake
// timeout).
func TestRemoteConnectionLimits(t *testing.T) {
	rd := newRemoteDevice(t, "max_connections: 6 max_connections_per_host: 3")
	d := rd.daemon
	alice, aliceKey := rd.owner.client(t, d.root, "alice", 40, time.Now().Add(24*time.Hour))
	d.must("user", "add", "alice", "--role", "administrator", "--cert-name", "alice")
	dialer := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}, Timeout: 2 * time.Second}
	var held []net.Conn
	for i := 0; i < 6; i++ {
		c, err := dialer.Dial("tcp", rd.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	// Each connection read at once, for up to 3 s: a held one times out,
	// a closed one ends at once.
	var closed atomic.Int32
	var wg sync.WaitGroup
	for _, c := range held {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			if _, err := c.Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				closed.Add(1)
			}
		}()
	}
	wg.Wait()
	if closed.Load() != 3 {
		t.Errorf("%d of 6 connections from one address closed at once, want 3", closed.Load())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "cmlctl"), "--remote", rd.addr, "--cert", alice, "--key", aliceKey, "--ca", filepath.Join(rd.fleet, "root-ca.pem"), "whoami")
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "alice") {
		t.Errorf("the administrator was not served while one address held its share: %v %s", err, out)
	}
}

// TestRemoteRevocationTakesEffectAtOnce: a client certificate revoked
// after its first handshake gets nothing more: not on a connection that
// is already open (every call re-checks the chain), and not by resuming
// its TLS session with a ticket from before the revocation (checked on
// resumption too; Go does not re-verify certificates on resumption).
func TestRemoteRevocationTakesEffectAtOnce(t *testing.T) {
	rd := newRemoteDevice(t, "")
	d := rd.daemon
	cp, kp := rd.owner.client(t, d.root, "dave", 50, time.Now().Add(24*time.Hour))
	d.must("user", "add", "dave", "--role", "administrator", "--cert-name", "dave")
	pair, err := tls.LoadX509KeyPair(cp, kp)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{pair}, InsecureSkipVerify: true, ClientSessionCache: tls.NewLRUClientSessionCache(8),
		MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, ServerName: "device"}
	resumes := func() (resumed bool, err error) {
		c, err := tls.Dial("tcp", rd.addr, cfg)
		if err != nil {
			return false, err
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err != nil {
			return false, err
		}
		return c.ConnectionState().DidResume, nil
	}
	conn, err := grpc.NewClient(rd.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := cmlv1.NewControlClient(conn)
	ctx := context.Background()
	if _, err := c.Whoami(ctx, &cmlv1.Empty{}); err != nil {
		t.Fatal(err)
	}
	if _, err := resumes(); err != nil {
		t.Fatal(err)
	}
	if r, err := resumes(); err != nil || !r {
		t.Fatalf("TLS sessions do not resume here (%v), so the test shows nothing", err)
	}
	crl, _ := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(2), ThisUpdate: time.Now().Add(-time.Minute), NextUpdate: time.Now().Add(time.Hour),
		RevokedCertificateEntries: []x509.RevocationListEntry{{SerialNumber: big.NewInt(50), RevocationTime: time.Now().Add(-time.Minute)}}}, rd.owner.cert, rd.owner.key)
	crlPath := filepath.Join(d.root, "dave.crl")
	os.WriteFile(crlPath, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: crl}), 0o644)
	d.must("ca", "crl", "load", crlPath)
	if _, err := c.Whoami(ctx, &cmlv1.Empty{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("a call on a connection opened before the revocation: %v", err)
	}
	if r, err := resumes(); err == nil {
		t.Errorf("a revoked certificate resumed its TLS session (resumed %t)", r)
	}
}
