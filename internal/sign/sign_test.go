package sign_test

import (
	"crypto/x509"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/testutil"
)

// TestOpensslVerifies checks every signature algorithm with stock openssl,
// the independent verifier a pipeline or auditor would use, with exactly
// the commands docs/signing.md gives.
func TestOpensslVerifies(t *testing.T) {
	testutil.RequireTool(t, "openssl")
	dir := t.TempDir()
	msg := filepath.Join(dir, "guestos.conf")
	os.WriteFile(msg, []byte("name: \"x\"\nversion: 1\n"), 0o644)
	for _, alg := range sign.Algorithms {
		k, err := sign.GenerateKey(alg)
		if err != nil {
			t.Fatal(err)
		}
		c, err := sign.Issue(nil, k, k.Public(), sign.CertOptions{CommonName: alg, CodeSigning: true, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		if err := sign.SignFile(msg, k, []*x509.Certificate{c}); err != nil {
			t.Fatal(err)
		}
		pub, _ := sign.PublicKeyPEM(k.Public())
		pubPath := filepath.Join(dir, "signer.pub")
		os.WriteFile(pubPath, pub, 0o644)
		var args []string
		switch alg {
		case "ed25519":
			args = []string{"pkeyutl", "-verify", "-pubin", "-inkey", pubPath, "-rawin", "-in", msg, "-sigfile", msg + sign.SigSuffix}
		case "rsa-3072", "rsa-4096":
			args = []string{"dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss", "-verify", pubPath, "-signature", msg + sign.SigSuffix, msg}
		default:
			args = []string{"dgst", "-sha256", "-verify", pubPath, "-signature", msg + sign.SigSuffix, msg}
		}
		if out, err := exec.Command("openssl", args...).CombinedOutput(); err != nil {
			t.Fatalf("%s: openssl %v: %v\n%s", alg, args, err, out)
		}
		// The certificate chain file is plain PEM openssl reads.
		if out, err := exec.Command("openssl", "x509", "-in", msg+sign.CertSuffix, "-noout", "-subject").CombinedOutput(); err != nil {
			t.Fatalf("%s: openssl x509: %v\n%s", alg, err, out)
		}
		// And a tampered file fails with openssl too.
		os.WriteFile(msg+".bad", []byte("name: \"y\"\nversion: 1\n"), 0o644)
		bad := append([]string{}, args...)
		for i, a := range bad {
			if a == msg {
				bad[i] = msg + ".bad"
			}
		}
		if err := exec.Command("openssl", bad...).Run(); err == nil {
			t.Fatalf("%s: openssl accepted a signature over different bytes", alg)
		}
	}
}

func TestWeakKeysRefused(t *testing.T) {
	if _, err := sign.GenerateKey("rsa-2048"); err == nil {
		t.Fatal("rsa-2048 generated")
	}
	// An RSA-2048 key made elsewhere (openssl) is refused on load.
	testutil.RequireTool(t, "openssl")
	p := filepath.Join(t.TempDir(), "k.pem")
	if out, err := exec.Command("openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", p).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	b, _ := os.ReadFile(p)
	if _, err := sign.ParsePrivateKey(b); err == nil {
		t.Fatal("RSA-2048 key accepted")
	}
	// An openssl P-384 key is accepted.
	if out, err := exec.Command("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", p).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	b, _ = os.ReadFile(p)
	if _, err := sign.ParsePrivateKey(b); err != nil {
		t.Fatalf("openssl P-384 key: %v", err)
	}
}
