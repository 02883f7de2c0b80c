package token

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	tpm2legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
	"github.com/miekg/pkcs11"

	"github.com/cmlproject/cml/internal/testutil"
	"github.com/cmlproject/cml/internal/tpmtest"
)

const id = "6f1c2d3e-0000-4000-8000-000000000001"

func TestSoftToken(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	k := &Keeper{MaxAttempts: 3}
	s, err := k.Create(ctx, Soft{}, dir, id, []byte("1234"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := k.Unlock(ctx, Soft{}, dir, id, []byte("1234"))
	if err != nil || !bytes.Equal(got, s) {
		t.Fatalf("unlock: %v", err)
	}
	// The secret is nowhere in the file.
	b, _ := os.ReadFile(filepath.Join(dir, softName))
	if bytes.Contains(b, s) {
		t.Error("secret in the soft token file")
	}
	// The file is bound to its container: under another id it does not
	// open, even with the PIN.
	if _, err := (Soft{}).Unwrap(ctx, dir, "another-id", []byte("1234")); !errors.Is(err, ErrWrongPIN) {
		t.Errorf("file opened for another container: %v", err)
	}
}

// TestLockout: wrong PINs are counted across keepers (a daemon restart),
// lock the token at the limit, after which the right PIN is refused too
// with the same message; a reset unlocks.
func TestLockout(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	if _, err := (&Keeper{}).Create(ctx, Soft{}, dir, id, []byte("1234")); err != nil {
		t.Fatal(err)
	}
	var msgs []string
	for i := 0; i < 3; i++ {
		k := &Keeper{MaxAttempts: 3} // a new one each time: the count is on disk
		_, err := k.Unlock(ctx, Soft{}, dir, id, []byte("0000"))
		var ue *UnlockError
		if !errors.As(err, &ue) {
			t.Fatalf("wrong PIN %d: %v", i, err)
		}
		msgs = append(msgs, err.Error())
		if i == 2 && !strings.Contains(ue.Detail, "locked") {
			t.Errorf("third wrong PIN: %q, want locked", ue.Detail)
		}
	}
	_, err := (&Keeper{MaxAttempts: 3}).Unlock(ctx, Soft{}, dir, id, []byte("1234"))
	var ue *UnlockError
	if !errors.As(err, &ue) || !strings.Contains(ue.Detail, "locked") {
		t.Fatalf("right PIN on a locked token: %v", err)
	}
	_, err2 := (&Keeper{}).Unlock(ctx, Soft{}, t.TempDir(), id, []byte("1234"))
	for _, m := range append(msgs, err.Error(), err2.Error()) {
		if m != msgs[0] {
			t.Errorf("refusals differ: %q vs %q (CR 1.10)", m, msgs[0])
		}
	}
	k := &Keeper{}
	if !k.Locked(dir) {
		t.Error("not locked")
	}
	if err := k.Reset(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Unlock(ctx, Soft{}, dir, id, []byte("1234")); err != nil {
		t.Errorf("after reset: %v", err)
	}
	if err := k.ChangePIN(ctx, Soft{}, dir, id, []byte("1234"), []byte("98765")); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Unlock(ctx, Soft{}, dir, id, []byte("98765")); err != nil {
		t.Errorf("new PIN: %v", err)
	}
	if _, err := k.Unlock(ctx, Soft{}, dir, id, []byte("1234")); err == nil {
		t.Error("old PIN still opens")
	}
}

// SoftHSM2 reads its configuration once per process (at the first
// C_Initialize), so the tests of this package share one token store.
var (
	softOnce sync.Once
	softDir  string
	softErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if softDir != "" {
		os.RemoveAll(softDir)
	}
	os.Exit(code)
}

func softHSM(t *testing.T) *PKCS11 {
	testutil.RequireTool(t, "softhsm2-util")
	module := "/usr/lib/softhsm/libsofthsm2.so"
	if _, err := os.Stat(module); err != nil {
		t.Skip("SoftHSM2 module not installed (apt-get install softhsm2)")
	}
	softOnce.Do(func() {
		if softDir, softErr = os.MkdirTemp("", "cml-softhsm-"); softErr != nil {
			return
		}
		os.MkdirAll(filepath.Join(softDir, "tokens"), 0o700)
		conf := filepath.Join(softDir, "softhsm2.conf")
		os.WriteFile(conf, []byte("directories.tokendir = "+filepath.Join(softDir, "tokens")+"\nobjectstore.backend = file\n"), 0o600)
		os.Setenv("SOFTHSM2_CONF", conf)
		if out, err := exec.Command("softhsm2-util", "--init-token", "--free", "--label", "cmltest", "--pin", "1234", "--so-pin", "5678").CombinedOutput(); err != nil {
			softErr = fmt.Errorf("softhsm2-util: %v\n%s", err, out)
		}
	})
	if softErr != nil {
		t.Fatal(softErr)
	}
	return &PKCS11{Module: module, Label: "cmltest"}
}

// TestPKCS11Token: a SoftHSM2 token wraps the secret with a key that
// never leaves it; a wrong PIN is refused; after Destroy a saved copy of
// the wrapped file no longer opens with the right PIN.
func TestPKCS11Token(t *testing.T) {
	p := softHSM(t)
	ctx := context.Background()
	dir := t.TempDir()
	k := &Keeper{MaxAttempts: 3}
	s, err := k.Create(ctx, p, dir, id, []byte("1234"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := k.Unlock(ctx, p, dir, id, []byte("1234"))
	if err != nil || !bytes.Equal(got, s) {
		t.Fatalf("unlock: %v", err)
	}
	var ue *UnlockError
	if _, err := k.Unlock(ctx, p, dir, id, []byte("9999")); !errors.As(err, &ue) || !strings.Contains(ue.Detail, "wrong PIN (1 of 3") {
		t.Errorf("wrong PIN: %v", err)
	}
	saved, _ := os.ReadFile(filepath.Join(dir, pkcs11Name))
	if err := p.DestroyWithPIN(ctx, dir, id, []byte("1234")); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, pkcs11Name), saved, 0o600)
	if _, err := p.Unwrap(ctx, dir, id, []byte("1234")); err == nil {
		t.Fatal("the saved wrapped key still unwraps after the wipe")
	}
}

// TestTPMToken: the secret lives in an NV index of a real (simulated) TPM
// under the PIN; a wrong PIN is refused; after Destroy a saved copy of the
// token file opens nothing with the right PIN. With PCRs bound, a PCR
// change refuses the right PIN.
func TestTPMToken(t *testing.T) {
	c := tpmtest.Simulator(t)
	for _, pcrs := range [][]uint32{nil, {16}} {
		tp := &TPM{RW: c, PCRs: pcrs}
		ctx := context.Background()
		dir := t.TempDir()
		k := &Keeper{MaxAttempts: 5}
		s, err := k.Create(ctx, tp, dir, id, []byte("1234"))
		if err != nil {
			t.Fatal(err)
		}
		got, err := k.Unlock(ctx, tp, dir, id, []byte("1234"))
		if err != nil || !bytes.Equal(got, s) {
			t.Fatalf("pcrs %v: unlock: %v", pcrs, err)
		}
		var ue *UnlockError
		if _, err := k.Unlock(ctx, tp, dir, id, []byte("9999")); !errors.As(err, &ue) || !strings.Contains(ue.Detail, "wrong PIN") {
			t.Errorf("pcrs %v: wrong PIN: %v", pcrs, err)
		}
		if err := k.ChangePIN(ctx, tp, dir, id, []byte("1234"), []byte("4321")); err != nil {
			t.Fatalf("change PIN: %v", err)
		}
		if got, err := k.Unlock(ctx, tp, dir, id, []byte("4321")); err != nil || !bytes.Equal(got, s) {
			t.Errorf("new PIN: %v", err)
		}
		if len(pcrs) > 0 {
			tpm2legacy.PCRExtend(c, tpmutil.Handle(16), tpm2legacy.AlgSHA256, make([]byte, 32), "")
			if _, err := tp.Unwrap(ctx, dir, id, []byte("4321")); err == nil || errors.Is(err, ErrWrongPIN) {
				t.Errorf("PCR changed, right PIN: %v, want a PCR refusal", err)
			}
		}
		saved, _ := os.ReadFile(filepath.Join(dir, tpmName))
		if err := tp.Destroy(ctx, dir, id); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, tpmName), saved, 0o600)
		if _, err := tp.Unwrap(ctx, dir, id, []byte("4321")); err == nil {
			t.Fatal("the saved token file still opens after the wipe")
		}
	}
}

// TestPKCS11Signer: a key generated on the token signs a certificate
// request that openssl verifies (an independent verifier) and
// signatures that verify with its public part; the key cannot be read
// off the token; a wrong PIN and an unknown label are refused.
func TestPKCS11Signer(t *testing.T) {
	p := softHSM(t)
	s, err := GenerateSigner(p.Module, p.Label, "alice-remote", []byte("1234"))
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("message"))
	sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d[:], sig) {
		t.Fatalf("signature does not verify: %v", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "alice"}}, s)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "alice.csr")
	os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr}), 0o600)
	if _, err := exec.LookPath("openssl"); err == nil {
		if out, err := exec.Command("openssl", "req", "-in", path, "-verify", "-noout").CombinedOutput(); err != nil {
			t.Errorf("openssl does not verify the request: %v %s", err, out)
		}
	}
	// The private value is not readable.
	if v, err := s.p.ctx.GetAttributeValue(s.sh, s.priv, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)}); err == nil && len(v) > 0 && len(v[0].Value) > 0 {
		t.Error("the private key's value can be read off the token")
	}
	s.Close()
	if _, err := GenerateSigner(p.Module, p.Label, "alice-remote", []byte("1234")); err == nil {
		t.Error("a second key with the same label was generated")
	}
	again, err := OpenSigner(p.Module, p.Label, "alice-remote", []byte("1234"))
	if err != nil {
		t.Fatal(err)
	}
	if sig, err := again.Sign(rand.Reader, d[:], crypto.SHA256); err != nil || !ecdsa.VerifyASN1(again.Public().(*ecdsa.PublicKey), d[:], sig) {
		t.Errorf("the reopened key does not sign: %v", err)
	}
	again.Close()
	if _, err := OpenSigner(p.Module, p.Label, "alice-remote", []byte("9999")); !errors.Is(err, ErrWrongPIN) {
		t.Errorf("wrong PIN: %v", err)
	}
	if _, err := OpenSigner(p.Module, p.Label, "nobody", []byte("1234")); err == nil || !strings.Contains(err.Error(), "no key labelled") {
		t.Errorf("unknown label: %v", err)
	}
}

// TestPKCS11ConcurrentPINs: unlocks with right and wrong PINs at once on
// one token. The token's login is shared by the process, so without one
// operation at a time a wrong PIN would ride on another's login (or a
// logout cut another off): every wrong PIN must fail, every right one
// succeed (run under -race too).
func TestPKCS11ConcurrentPINs(t *testing.T) {
	p := softHSM(t)
	ctx := context.Background()
	dir := t.TempDir()
	cid := "6f1c2d3e-0000-4000-8000-0000000000c1"
	secret := bytes.Repeat([]byte{7}, 32)
	if err := p.Wrap(ctx, dir, cid, []byte("1234"), secret); err != nil {
		t.Fatal(err)
	}
	defer p.DestroyWithPIN(ctx, dir, cid, []byte("1234"))
	var wg sync.WaitGroup
	errs := make(chan string, 40)
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			pin := []byte("1234")
			if i%2 == 1 {
				pin = []byte("0000")
			}
			got, err := p.Unwrap(ctx, dir, cid, pin)
			switch {
			case i%2 == 1 && err == nil:
				errs <- "a wrong PIN unwrapped the secret"
			case i%2 == 0 && (err != nil || !bytes.Equal(got, secret)):
				errs <- fmt.Sprintf("the right PIN failed: %v", err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}
