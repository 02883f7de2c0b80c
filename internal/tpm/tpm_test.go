package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/cmlproject/cml/internal/sign"
)

func sim(t *testing.T) *Conn {
	t.Helper()
	s, err := simulator.Get()
	if err != nil {
		t.Fatal(err)
	}
	c := NewConn(s, "simulator")
	t.Cleanup(func() { c.Close() })
	return c
}

// TestIdentityKeysPersistAndCertify creates the keys, loads them again
// (as a restart would) and checks they are the same keys, that the
// attestation key is restricted and the TLS key is not, that both CSRs
// verify with openssl, and that a certificate for another key is refused.
func TestIdentityKeysPersistAndCertify(t *testing.T) {
	c := sim(t)
	k, err := EnsureKeys(c)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := EnsureKeys(c)
	if err != nil {
		t.Fatal(err)
	}
	if !k2.Attestation.PublicKey().(interface{ Equal(crypto.PublicKey) bool }).Equal(k.Attestation.PublicKey()) ||
		!k2.TLS.PublicKey().(interface{ Equal(crypto.PublicKey) bool }).Equal(k.TLS.PublicKey()) {
		t.Fatal("keys changed between loads")
	}
	if k.Attestation.PublicArea().Attributes&tpm2.FlagRestricted == 0 {
		t.Error("attestation key is not restricted")
	}
	if k.TLS.PublicArea().Attributes&tpm2.FlagRestricted != 0 {
		t.Error("TLS key is restricted")
	}
	for _, a := range []tpm2.KeyProp{tpm2.FlagFixedTPM, tpm2.FlagFixedParent, tpm2.FlagSensitiveDataOrigin} {
		if k.TLS.PublicArea().Attributes&a == 0 || k.Attestation.PublicArea().Attributes&a == 0 {
			t.Errorf("key attribute %#x missing: private part could leave the TPM", a)
		}
	}
	subj := Subject{DeviceUUID: "6f1c2f7a-0000-4000-8000-000000000001", CommonName: "CML device 42"}
	dir := t.TempDir()
	for name, mk := range map[string]func(Subject) ([]byte, error){"tls": k.TLSCSR, "attestation": k.AttestationCSR} {
		der, err := mk(subj)
		if err != nil {
			t.Fatalf("%s CSR: %v", name, err)
		}
		csr, err := x509.ParseCertificateRequest(der)
		if err != nil {
			t.Fatal(err)
		}
		if len(csr.URIs) != 1 || csr.URIs[0].String() != "urn:uuid:"+subj.DeviceUUID {
			t.Errorf("%s CSR URIs %v", name, csr.URIs)
		}
		p := filepath.Join(dir, name+".csr")
		os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), 0o600)
		if out, err := exec.Command("openssl", "req", "-in", p, "-noout", "-verify").CombinedOutput(); err != nil {
			t.Errorf("openssl rejects the %s CSR: %v\n%s", name, err, out)
		}
	}
	// A restricted key must refuse to sign something shaped like a TPM
	// attestation (TPM_GENERATED_VALUE prefix): that is what keeps quotes
	// unforgeable.
	if _, err := k.Attestation.SignData([]byte("\xffTCG forged attestation")); err == nil {
		t.Error("attestation key signed data starting with TPM_GENERATED_VALUE")
	}
	self, err := k.SelfSigned(subj, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(self)
	if which, err := k.KeyFor(cert); err != nil || which != "tls" {
		t.Errorf("self-signed certificate: %q %v", which, err)
	}
	other := otherDevice(t)
	oc, _ := other.SelfSigned(subj, time.Now())
	ocert, _ := x509.ParseCertificate(oc)
	if _, err := k.KeyFor(ocert); err == nil {
		t.Error("a certificate for another device's key was accepted")
	}
}

// otherDevice makes keys on a second TPM: another device. The simulator
// is a process-wide singleton, so the second device is a swtpm.
func otherDevice(t *testing.T) *Keys {
	s := startSwtpm(t, t.TempDir())
	c, err := s.Dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	k, err := EnsureKeys(c)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// startSwtpm starts a swtpm on dir, stopped at cleanup (Stop may also be
// called earlier); it skips the test when swtpm is not installed.
func startSwtpm(t *testing.T, dir string) *Swtpm {
	t.Helper()
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Skip("swtpm is not installed (scripts/install-deps.sh installs it)")
	}
	s, err := StartSwtpm(context.Background(), dir, quiet)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// TestRollbackCounterOnlyRises raises and tries to lower versions, reopens
// the table, and fills it.
func TestRollbackCounterOnlyRises(t *testing.T) {
	c := sim(t)
	tpm2.NVUndefineSpace(c, "", tpm2.HandleOwner, VersionsIndex)
	v, err := OpenVersions(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Raise("busybox", 5); err != nil {
		t.Fatal(err)
	}
	v.Raise("busybox", 3)
	v.Raise("debian", 20261121)
	v, err = OpenVersions(c)
	if err != nil {
		t.Fatal(err)
	}
	if got := v.Highest("busybox"); got != 5 {
		t.Errorf("busybox: %d, want 5 (a lower version must not overwrite)", got)
	}
	if got := v.Highest("debian"); got != 20261121 {
		t.Errorf("debian: %d", got)
	}
	if got := v.Highest("never"); got != 0 {
		t.Errorf("unknown name: %d", got)
	}
	for i := 2; i < versionEntries; i++ {
		if err := v.Raise(fmt.Sprintf("os%d", i), 1); err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
	}
	if err := v.Raise("one-too-many", 1); err == nil {
		t.Error("a full table accepted another name")
	}
	if got := v.Highest("busybox"); got != 5 {
		t.Errorf("busybox after filling: %d", got)
	}
}

// TestQuoteCoversLogUnderConcurrentStarts quotes while other goroutines
// measure: each quote's PCR must equal the replay of the log returned with
// it, or a verifier would reject honest devices.
func TestQuoteCoversLogUnderConcurrentStarts(t *testing.T) {
	c := sim(t)
	k, err := EnsureKeys(c)
	if err != nil {
		t.Fatal(err)
	}
	// The simulator is shared by the tests in this package: start from
	// whatever PCR 11 holds by using a PCR of our own.
	m, err := NewMeasurer(c, 14, filepath.Join(t.TempDir(), "log.cel"))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := 0; g < 3; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				if err := m.Measure(t.Context(), Event{Container: fmt.Sprint(g), Version: uint64(i)}); err != nil {
					t.Error(err)
				}
			}
		}(g)
	}
	for i := 0; i < 5; i++ {
		q, log, err := m.Attest(k, []byte(fmt.Sprint("nonce", i)), []int{14})
		if err != nil {
			t.Fatal(err)
		}
		l, err := DecodeLog(log)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(Replay(l, 14), q.PCRs[14]) {
			t.Fatalf("quote %d: PCR does not match the log returned with it", i)
		}
	}
	wg.Wait()
}

// TestSwtpmKeepsIdentityAndResetsPCRs runs the swtpm cmld supervises:
// keys and NV survive a restart of swtpm, PCRs do not, and the measurement
// log starts over instead of refusing to open. Killing swtpm makes the
// supervisor restart it and the connection redial.
func TestSwtpmKeepsIdentityAndResetsPCRs(t *testing.T) {
	dir := t.TempDir()
	s := startSwtpm(t, dir)
	c, _ := s.Dial()
	k, err := EnsureKeys(c)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := OpenVersions(c)
	v.Raise("busybox", 7)
	logPath := filepath.Join(dir, "measurements.cel")
	m, err := NewMeasurer(c, DefaultPCR, logPath)
	if err != nil {
		t.Fatal(err)
	}
	m.Measure(t.Context(), Event{Container: "a"})
	// A crash of swtpm: the supervisor restarts it and the connection
	// redials; the next measurement notices the reset PCR.
	s.mu.Lock()
	s.cmd.Process.Signal(syscall.SIGKILL)
	s.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := m.PCRValue(); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("swtpm was not restarted")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := m.Measure(t.Context(), Event{Container: "b"}); err != nil {
		t.Fatalf("measure after swtpm restart: %v", err)
	}
	if m.Resets() != 1 {
		t.Errorf("resets %d, want 1", m.Resets())
	}
	c.Close()
	s.Stop()

	s = startSwtpm(t, dir)
	c, _ = s.Dial()
	defer c.Close()
	k2, err := EnsureKeys(c)
	if err != nil {
		t.Fatal(err)
	}
	if !k2.Attestation.PublicKey().(interface{ Equal(crypto.PublicKey) bool }).Equal(k.Attestation.PublicKey()) {
		t.Error("attestation key changed across a swtpm restart")
	}
	v, _ = OpenVersions(c)
	if v.Highest("busybox") != 7 {
		t.Error("rollback counter lost across a swtpm restart")
	}
	pcr, _ := tpm2.ReadPCR(c, DefaultPCR, tpm2.AlgSHA256)
	if !bytes.Equal(pcr, make([]byte, sha256.Size)) {
		t.Error("PCR survived a swtpm restart")
	}
	if _, err := NewMeasurer(c, DefaultPCR, logPath); err != nil {
		t.Fatalf("log after a TPM reset: %v", err)
	}
	if _, err := os.Stat(logPath + ".old"); err != nil {
		t.Error("old log not kept")
	}
}

// TestKernelTPM runs identity, measurement and a quote on the host's TPM
// through the kernel resource manager. It uses CML's own handles and a
// debug PCR (16), so it does not disturb a host's boot measurements.
func TestKernelTPM(t *testing.T) {
	if _, err := os.Stat(DevicePath); err != nil {
		t.Skip("no " + DevicePath + " on this machine (no kernel TPM); the swtpm and simulator tests cover the same code")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to open " + DevicePath)
	}
	c, err := OpenDevice(DevicePath)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	k, err := EnsureKeys(c)
	if err != nil {
		t.Fatal(err)
	}
	tpm2.PCRReset(c, 16)
	m, err := NewMeasurer(c, 16, filepath.Join(t.TempDir(), "log.cel"))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Measure(t.Context(), Event{Container: "kernel-tpm-test"}); err != nil {
		t.Fatal(err)
	}
	nonce := []byte("kernel-tpm-nonce")
	q, log, err := m.Attest(k, nonce, []int{16})
	if err != nil {
		t.Fatal(err)
	}
	l, _ := DecodeLog(log)
	if !bytes.Equal(Replay(l, 16), q.PCRs[16]) {
		t.Fatal("log does not replay to the quoted PCR")
	}
	// tpm2-tools, an independent verifier, accepts the kernel TPM's quote
	// (and refuses it for another nonce).
	if _, err := exec.LookPath("tpm2_checkquote"); err != nil {
		t.Log("tpm2_checkquote not installed: independent check skipped")
		return
	}
	dir := t.TempDir()
	pub, err := sign.PublicKeyPEM(k.Attestation.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	for n, b := range map[string][]byte{"ak.pem": pub, "quote.bin": q.Attest, "sig.bin": q.Signature} {
		os.WriteFile(filepath.Join(dir, n), b, 0o600)
	}
	if out, err := exec.Command("tpm2_pcrread", "-T", "device:"+DevicePath, "sha256:16", "-o", filepath.Join(dir, "pcrs.bin")).CombinedOutput(); err != nil {
		t.Fatalf("tpm2_pcrread: %v\n%s", err, out)
	}
	check := func(n []byte) error {
		out, err := exec.Command("tpm2_checkquote", "-u", filepath.Join(dir, "ak.pem"), "-m", filepath.Join(dir, "quote.bin"),
			"-s", filepath.Join(dir, "sig.bin"), "-f", filepath.Join(dir, "pcrs.bin"), "-l", "sha256:16", "-g", "sha256", "-q", hex.EncodeToString(n)).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	if err := check(nonce); err != nil {
		t.Fatalf("tpm2_checkquote rejects the kernel TPM's quote: %v", err)
	}
	if check([]byte("another-nonce-00")) == nil {
		t.Fatal("tpm2_checkquote accepted a wrong nonce")
	}
}

// TestForeignPCRUse: a PCR that something else on the host already
// extended is refused with advice, not adopted; and a second swtpm on the
// same state says why it could not start.
func TestForeignPCRUse(t *testing.T) {
	c := sim(t)
	if err := tpm2.PCRExtend(c, 13, tpm2.AlgSHA256, make([]byte, 32), ""); err != nil {
		t.Fatal(err)
	}
	_, err := NewMeasurer(c, 13, filepath.Join(t.TempDir(), "log.cel"))
	if err == nil || !strings.Contains(err.Error(), "measurement_pcr") {
		t.Fatalf("foreign use of PCR 13: %v", err)
	}
	dir := t.TempDir()
	startSwtpm(t, dir)
	other := filepath.Join(t.TempDir(), "other")
	os.MkdirAll(other, 0o700)
	os.Symlink(filepath.Join(dir, "state"), filepath.Join(other, "state"))
	if _, err := StartSwtpm(context.Background(), other, quiet); err == nil || !strings.Contains(err.Error(), "exited at start") {
		t.Fatalf("second swtpm on the same state: %v", err)
	} else {
		t.Log(err)
	}
}
