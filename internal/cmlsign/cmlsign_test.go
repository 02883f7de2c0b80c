package cmlsign

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/cmlproject/cml/internal/testutil"
)

func run(t *testing.T, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := NewCommand(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

type entry struct {
	name, body, link string
	typ              byte
}

func layer(t *testing.T, entries ...entry) v1.Layer {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Mode: 0o755, Typeflag: e.typ, Linkname: e.link, Size: int64(len(e.body))}
		if e.typ == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag != tar.TypeReg {
			h.Size = 0
		}
		tw.WriteHeader(h)
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func writeLayout(t *testing.T, layers ...v1.Layer) string {
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.Config.Entrypoint = []string{"/bin/app", "--serve"}
	cf.Config.Env = []string{"PATH=/bin"}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestOCILayoutWhiteouts builds a guest OS root from a two-layer OCI image
// whose upper layer deletes a file and makes a directory opaque.
func TestOCILayoutWhiteouts(t *testing.T) {
	dir := writeLayout(t,
		layer(t, entry{name: "bin/app", body: "#!/bin/sh\n"}, entry{name: "etc/secret", body: "s"}, entry{name: "etc/keep", body: "k"},
			entry{name: "data/", typ: tar.TypeDir}, entry{name: "data/old", body: "o"}),
		layer(t, entry{name: "etc/.wh.secret", body: ""}, entry{name: "data/.wh..wh..opq", body: ""}, entry{name: "data/new", body: "n"},
			entry{name: "bin/sh", typ: tar.TypeSymlink, link: "app"}))
	root := t.TempDir()
	img, err := UnpackOCI(dir, "", root)
	if err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]bool{"bin/app": true, "etc/keep": true, "etc/secret": false, "data/old": false, "data/new": true, "etc/.wh.secret": false} {
		if _, err := os.Lstat(filepath.Join(root, p)); (err == nil) != want {
			t.Errorf("%s: present=%v, want %v", p, err == nil, want)
		}
	}
	if l, _ := os.Readlink(filepath.Join(root, "bin/sh")); l != "app" {
		t.Errorf("symlink bin/sh -> %q", l)
	}
	if img.Init != "/bin/app" || len(img.Params) != 1 || img.Env[0] != "PATH=/bin" {
		t.Errorf("image config: %+v", img)
	}
}

// TestOCILayoutEscapesRefused feeds layers that try to write outside the
// root: a .. path, and a file through a symlink pointing out.
func TestOCILayoutEscapesRefused(t *testing.T) {
	outside := t.TempDir()
	for name, l := range map[string]v1.Layer{
		"dotdot":   layer(t, entry{name: "../../escaped", body: "x"}),
		"symlink":  layer(t, entry{name: "evil", typ: tar.TypeSymlink, link: outside}, entry{name: "evil/escaped", body: "x"}),
		"hardlink": layer(t, entry{name: "h", typ: tar.TypeLink, link: "../../etc/passwd"}),
	} {
		root := t.TempDir()
		if _, err := UnpackOCI(writeLayout(t, l), "", root); err == nil {
			t.Errorf("%s: unpacked", name)
		}
		if _, err := os.Stat(filepath.Join(outside, "escaped")); err == nil {
			t.Fatalf("%s: a layer wrote outside the root", name)
		}
	}
}

// TestBuildFromOCIAndVerify builds a signed guest OS from an OCI layout
// with the command line and checks it with cmlsign verify and openssl.
func TestBuildFromOCIAndVerify(t *testing.T) {
	testutil.RequireTool(t, "mkfs.erofs", "openssl")
	pki := t.TempDir()
	if _, err := run(t, "pki", "init", "--dir", pki, "--algorithm", "ecdsa-p384"); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(filepath.Join(pki, "signer.key")); st.Mode().Perm() != 0o600 {
		t.Errorf("signer.key mode %o", st.Mode().Perm())
	}
	oci := writeLayout(t, layer(t, entry{name: "bin/app", body: "#!/bin/sh\n"}))
	out := t.TempDir()
	if _, err := run(t, "guestos", "build", "--oci-layout", oci, "--name", "app", "--version", "3", "--all-root",
		"--key", filepath.Join(pki, "signer.key"), "--cert", filepath.Join(pki, "signer.pem"), "--out", out); err != nil {
		t.Fatal(err)
	}
	m, _ := os.ReadFile(filepath.Join(out, "guestos.conf"))
	if !strings.Contains(string(m), `"/bin/app"`) || !strings.Contains(string(m), "verity_root_hash") {
		t.Errorf("manifest:\n%s", m)
	}
	if o, err := run(t, "verify", "--ca", filepath.Join(pki, "root-ca.pem"), filepath.Join(out, "guestos.conf")); err != nil || !strings.Contains(o, "OK") {
		t.Fatalf("cmlsign verify: %v %s", err, o)
	}
	if o, err := exec.Command("openssl", "dgst", "-sha256", "-verify", filepath.Join(pki, "signer.pub"), "-signature", filepath.Join(out, "guestos.conf.sig"), filepath.Join(out, "guestos.conf")).CombinedOutput(); err != nil {
		t.Fatalf("openssl: %v %s", err, o)
	}
	// A config that the device would refuse is not signed.
	bad := filepath.Join(t.TempDir(), "bad.conf")
	os.WriteFile(bad, []byte("name: \"../x\"\nguest_os: \"app\"\n"), 0o644)
	if _, err := run(t, "config", "--key", filepath.Join(pki, "signer.key"), "--cert", filepath.Join(pki, "signer.pem"), bad); err == nil {
		t.Error("invalid config signed")
	}
	if _, err := os.Stat(bad + ".sig"); err == nil {
		t.Error("signature written for a refused config")
	}
}

// TestPKCS11Signing signs with a key that lives in a SoftHSM2 token and
// never leaves it, certified by cmlsign pki issue.
func TestPKCS11Signing(t *testing.T) {
	testutil.RequireTool(t, "softhsm2-util", "pkcs11-tool", "openssl")
	module := "/usr/lib/softhsm/libsofthsm2.so"
	if _, err := os.Stat(module); err != nil {
		t.Skip("SoftHSM2 module not installed (apt-get install softhsm2)")
	}
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "tokens"), 0o700)
	conf := filepath.Join(dir, "softhsm2.conf")
	os.WriteFile(conf, []byte("directories.tokendir = "+filepath.Join(dir, "tokens")+"\nobjectstore.backend = file\n"), 0o600)
	t.Setenv("SOFTHSM2_CONF", conf)
	sh := func(name string, args ...string) {
		if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
	}
	sh("softhsm2-util", "--init-token", "--free", "--label", "cml", "--pin", "1234", "--so-pin", "5678")
	sh("pkcs11-tool", "--module", module, "--login", "--pin", "1234", "--keypairgen", "--key-type", "EC:prime256v1", "--label", "release", "--id", "01")
	pub := filepath.Join(dir, "pub.der")
	sh("pkcs11-tool", "--module", module, "--read-object", "--type", "pubkey", "--label", "release", "-o", pub)
	pki := filepath.Join(dir, "pki")
	if _, err := run(t, "pki", "init", "--dir", pki); err != nil {
		t.Fatal(err)
	}
	cert := filepath.Join(dir, "release.pem")
	if _, err := run(t, "pki", "issue", "--ca-cert", filepath.Join(pki, "root-ca.pem"), "--ca-key", filepath.Join(pki, "root-ca.key"), "--pubkey", pub, "--cn", "release signing (HSM)", "--out", cert); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "c.conf")
	os.WriteFile(cfg, []byte("name: \"c\"\nguest_os: \"busybox\"\n"), 0o644)
	signArgs := []string{"config", "--pkcs11-module", module, "--key-label", "release", "--cert", cert, cfg}
	t.Setenv("CML_PKCS11_PIN", "9999")
	if _, err := run(t, signArgs...); err == nil || !strings.Contains(err.Error(), "PIN") {
		t.Fatalf("wrong PIN: %v", err)
	}
	if _, err := os.Stat(cfg + ".sig"); err == nil {
		t.Fatal("signature written with a wrong PIN")
	}
	t.Setenv("CML_PKCS11_PIN", "1234")
	if _, err := run(t, signArgs...); err != nil {
		t.Fatal(err)
	}
	if o, err := run(t, "verify", "--ca", filepath.Join(pki, "root-ca.pem"), cfg); err != nil {
		t.Fatalf("verify: %v %s", err, o)
	}
	pubPEM := filepath.Join(dir, "pub.pem")
	sh("openssl", "pkey", "-pubin", "-inform", "DER", "-in", pub, "-out", pubPEM)
	sh("openssl", "dgst", "-sha256", "-verify", pubPEM, "-signature", cfg+".sig", cfg)
}
