package backup

import (
	"archive/tar"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/cmlproject/cml/internal/sign"
)

func deviceKey(t *testing.T) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "CML device test"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return k, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

var testFiles = map[string][]byte{
	"device.conf":                     []byte("product_name: \"test\"\n"),
	"containers/a/config.conf":        []byte("name: \"a\"\n"),
	"containers/a/config.conf.sig":    []byte("sig"),
	"trust/owner/0123.pem":            []byte("-----BEGIN CERTIFICATE-----\n"),
	"access/accounts.json":            []byte("{}\n"),
	"containers/b/config.conf":        []byte("name: \"b\"\n"),
	"containers/b/config.conf.cert":   []byte("chain"),
	"guestos/installed.json":          []byte("[]\n"),
	"containers/b/config.conf.unused": nil,
}

// retar rewrites a backup's tar through edit (an attacker who has the
// plaintext, or who encrypts to the owner's public recipient, which needs
// no secret).
func retar(t *testing.T, plain []byte, edit func(name string, b []byte) (string, []byte), extra map[string][]byte) []byte {
	t.Helper()
	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	tr := tar.NewReader(bytes.NewReader(plain))
	write := func(n string, b []byte) {
		tw.WriteHeader(&tar.Header{Name: n, Mode: 0o600, Size: int64(len(b)), Typeflag: tar.TypeReg})
		tw.Write(b)
	}
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		var buf bytes.Buffer
		buf.ReadFrom(tr)
		n, b := h.Name, buf.Bytes()
		if edit != nil {
			n, b = edit(n, b)
		}
		if n != "" {
			write(n, b)
		}
	}
	for n, b := range extra {
		write(n, b)
	}
	tw.Close()
	return out.Bytes()
}

// TestBackupRoundTripAndTampering: a sealed backup opens with the owner's
// identity and gives back every file; a wrong identity, a changed byte of
// the ciphertext, a changed, added or removed file, an edited MANIFEST and
// another key's signature are each refused — the last four re-encrypted
// to the owner's public recipient, as anyone can.
func TestBackupRoundTripAndTampering(t *testing.T) {
	key, chain := deviceKey(t)
	owner, _ := age.GenerateX25519Identity()
	other, _ := age.GenerateX25519Identity()
	info := Info{Device: "d-1", Created: time.Now().UTC().Truncate(time.Second), By: "root"}
	var sealed bytes.Buffer
	if err := Seal(&sealed, info, testFiles, key, chain, []age.Recipient{owner.Recipient()}); err != nil {
		t.Fatal(err)
	}
	b, err := Decrypt(bytes.NewReader(sealed.Bytes()), []age.Identity{owner})
	if err != nil {
		t.Fatal(err)
	}
	if b.Info.Device != "d-1" || b.Info.By != "root" || !b.Info.Created.Equal(info.Created) {
		t.Errorf("info %+v", b.Info)
	}
	for n, want := range testFiles {
		if got, ok := b.Files[n]; !ok || !bytes.Equal(got, want) {
			t.Errorf("%s: %q %v", n, got, ok)
		}
	}
	if len(b.Files) != len(testFiles) || !b.Chain[0].Equal(mustCert(t, chain)) {
		t.Errorf("files %v, chain %v", b.Names(), b.Chain[0].Subject)
	}

	if _, err := Decrypt(bytes.NewReader(sealed.Bytes()), []age.Identity{other}); err == nil {
		t.Error("opened with another identity")
	}
	flipped := bytes.Clone(sealed.Bytes())
	flipped[len(flipped)-40] ^= 1
	if _, err := Decrypt(bytes.NewReader(flipped), []age.Identity{owner}); err == nil {
		t.Error("a changed ciphertext byte opened")
	}
	otherKey, otherChain := deviceKey(t)
	forged, _ := Build(info, testFiles, otherKey, otherChain)
	cases := map[string][]byte{
		"changed file": retar(t, b.Plain, func(n string, x []byte) (string, []byte) {
			if n == "containers/a/config.conf" {
				return n, []byte("name: \"a\"\nprivileged: true\n")
			}
			return n, x
		}, nil),
		"added file": retar(t, b.Plain, nil, map[string][]byte{"containers/evil/config.conf": []byte("name: \"evil\"\n")}),
		"removed file": retar(t, b.Plain, func(n string, x []byte) (string, []byte) {
			if n == "trust/owner/0123.pem" {
				return "", nil
			}
			return n, x
		}, nil),
		"edited manifest": retar(t, b.Plain, func(n string, x []byte) (string, []byte) {
			if n == ManifestFile {
				return n, bytes.Replace(x, []byte("device.conf"), []byte("device.cfg"), 1)
			}
			if n == "device.conf" {
				return "device.cfg", x
			}
			return n, x
		}, nil),
		"another key, this device's chain": retar(t, forged, func(n string, x []byte) (string, []byte) {
			if n == ChainFile {
				return n, chain
			}
			return n, x
		}, nil),
		"path out of the directory": retar(t, b.Plain, nil, map[string][]byte{"../etc/cml/device.conf": []byte("x")}),
	}
	for name, plain := range cases {
		var enc bytes.Buffer
		if err := Encrypt(&enc, plain, []age.Recipient{owner.Recipient()}); err != nil {
			t.Fatal(err)
		}
		if _, err := Decrypt(&enc, []age.Identity{owner}); err == nil {
			t.Errorf("%s: accepted", name)
		} else if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: error of more than one line: %q", name, err)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	if err := Seal(&bytes.Buffer{}, info, map[string][]byte{"../x": nil}, key, chain, []age.Recipient{owner.Recipient()}); err == nil {
		t.Error("sealed a file named ../x")
	}
	if err := Seal(&bytes.Buffer{}, info, testFiles, key, chain, nil); err == nil {
		t.Error("sealed to nobody")
	}
}

func mustCert(t *testing.T, p []byte) *x509.Certificate {
	t.Helper()
	c, err := sign.ParseCertificates(p)
	if err != nil {
		t.Fatal(err)
	}
	return c[0]
}

// TestBackupOpensWithStandardTools: the owner needs no CML to check and
// open a backup: age decrypts it, tar unpacks it, openssl verifies the
// device's signature of MANIFEST and sha256sum checks every file.
func TestBackupOpensWithStandardTools(t *testing.T) {
	for _, tool := range []string{"age", "openssl", "sha256sum", "tar"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (scripts/install-deps.sh installs it)", tool)
		}
	}
	key, chain := deviceKey(t)
	owner, _ := age.GenerateX25519Identity()
	dir := t.TempDir()
	var sealed bytes.Buffer
	if err := Seal(&sealed, Info{Device: "d-1", Created: time.Now().UTC()}, testFiles, key, chain, []age.Recipient{owner.Recipient()}); err != nil {
		t.Fatal(err)
	}
	write := func(n string, b []byte) string {
		p := filepath.Join(dir, n)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	in := write("b.cmlbackup", sealed.Bytes())
	idFile := write("owner.key", []byte(owner.String()+"\n"))
	out := filepath.Join(dir, "x")
	os.Mkdir(out, 0o700)
	run := func(name string, args ...string) {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Dir = out
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, b)
		}
	}
	run("sh", "-c", "age -d -i "+idFile+" "+in+" | tar -x")
	run("openssl", "x509", "-in", ChainFile, "-pubkey", "-noout", "-out", "pub.pem")
	run("openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", SignatureFile, ManifestFile)
	run("sha256sum", "--strict", "-c", ManifestFile)
	os.WriteFile(filepath.Join(out, "device.conf"), []byte("tampered"), 0o600)
	if err := exec.Command("sha256sum", "--quiet", "-c", ManifestFile).Run(); err == nil {
		t.Error("sha256sum -c accepted a changed file")
	}
}

// TestSignedUnder: a backup is accepted from its own signer or a device
// the given issuer certified (a replacement device of the same owner),
// not from a device of another issuer.
func TestSignedUnder(t *testing.T) {
	newCA := func(cn string) (*x509.Certificate, *ecdsa.PrivateKey) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
		der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
		c, _ := x509.ParseCertificate(der)
		return c, k
	}
	ca, caKey := newCA("owner device CA")
	other, _ := newCA("another CA")
	dev, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(8), Subject: pkix.Name{CommonName: "CML device 1"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, ca, &dev.PublicKey, caKey)
	chain := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	plain, err := Build(Info{Device: "d-1", Created: time.Now()}, testFiles, dev, chain)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Parse(plain)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.SignedUnder([]*x509.Certificate{ca}); err != nil {
		t.Errorf("a device of the same issuer: %v", err)
	}
	if err := b.SignedUnder([]*x509.Certificate{b.Chain[0]}); err != nil {
		t.Errorf("the signer itself: %v", err)
	}
	if err := b.SignedUnder([]*x509.Certificate{other}); err == nil {
		t.Error("a device of another issuer accepted")
	}
	if err := b.SignedUnder(nil); err == nil {
		t.Error("accepted with no anchor")
	}
}
