package e2e

import (
	"bytes"
	"crypto/x509"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/testutil"
)

// snapshot lists every path under dir, to show that a refusal changed
// nothing on disk.
func snapshot(t *testing.T, dir string) string {
	var paths []string
	filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
		// The audit trail, the lock, the TPM's own state and the
		// measurement log (rotated when a restart resets the swtpm's
		// PCRs) change with every run; refusals must not touch the rest.
		rel, _ := filepath.Rel(dir, p)
		if rel == "tpm" || strings.HasPrefix(rel, "tpm/") || strings.HasPrefix(rel, "measurements.cel") {
			return nil
		}
		if err == nil && !strings.Contains(p, "audit.log") && !strings.HasSuffix(p, "cmld.lock") {
			paths = append(paths, p)
		}
		return nil
	})
	return strings.Join(paths, "\n")
}

func TestBadContainerConfigs(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("taken", "")
	cases := []struct {
		name, body, want string
	}{
		{"malformed", "name: \"x\"\nguest_os: \"busybox\"\nram_limit: \"lots\"\n", "bad.conf:3"},
		{"unknown field", "name: \"x\"\nguest_os: \"busybox\"\nflux_capacitor: 1\n", "unknown field: flux_capacitor"},
		{"bad enum", "name: \"x\"\nguest_os: \"busybox\"\ntype: DOCKER\n", "bad.conf:3"},
		{"out of range", "name: \"x\"\nguest_os: \"busybox\"\ncpu_weight: 20000\n", "bad.conf:3: field cpu_weight"},
		{"duplicate name", "name: \"taken\"\nguest_os: \"busybox\"\n", "already exists"},
		{"path separator", "name: \"a/b\"\nguest_os: \"busybox\"\n", "not a safe identifier"},
		{"dot dot", "name: \"..\"\nguest_os: \"busybox\"\n", "not a safe identifier"},
		{"control char", "name: \"a\\nb\"\nguest_os: \"busybox\"\n", "not a safe identifier"},
		{"too long", "name: \"" + strings.Repeat("a", 65) + "\"\nguest_os: \"busybox\"\n", "not a safe identifier"},
		{"missing guest OS", "name: \"x\"\nguest_os: \"nosuch\"\n", "guestos nosuch is not installed"},
		{"ram under minimum", "name: \"x\"\nguest_os: \"busybox\"\nram_limit: 8\n", "under guest OS busybox's minimum"},
		{"kvm", "name: \"x\"\nguest_os: \"busybox\"\ntype: KVM\n", "not supported"},
		{"capability that breaks isolation", "name: \"x\"\nguest_os: \"busybox\"\ncapabilities_keep: \"CAP_SYS_ADMIN\"\n", "break container isolation"},
		{"all-devices rule", "name: \"x\"\nguest_os: \"busybox\"\nallow_dev: \"a *:* rwm\"\n", "field allow_dev"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, d.stateDir)
			// Signed by the trusted signer where cmlsign agrees to sign
			// it: the daemon's own checks must refuse it regardless.
			p := filepath.Join(d.root, "bad.conf")
			os.WriteFile(p, []byte(tc.body), 0o644)
			exec.Command(filepath.Join(binDir, "cmlsign"), "config", "--key", filepath.Join(pkiDir, "signer.key"), "--cert", filepath.Join(pkiDir, "signer.pem"), p).Run()
			d.refuse(tc.want, "create", p)
			os.Remove(p + ".sig")
			os.Remove(p + ".cert")
			if after := snapshot(t, d.stateDir); after != before {
				t.Errorf("refused create changed the state directory")
			}
		})
	}
}

// copyGuestOS copies the demo guest OS to a new directory to tamper with.
func copyGuestOS(t *testing.T, d *daemon) string {
	dir := filepath.Join(d.root, "tampered")
	os.RemoveAll(dir)
	if out, err := exec.Command("cp", "-r", guestOSDir, dir).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	return dir
}

// resign signs a guest OS manifest again with the trusted signer, as an
// insider with the signing key would after tampering: the daemon's parser
// must still refuse what is wrong.
func resign(t *testing.T, dir string) {
	kb, _ := os.ReadFile(filepath.Join(pkiDir, "signer.key"))
	cb, _ := os.ReadFile(filepath.Join(pkiDir, "signer.pem"))
	k, err := sign.ParsePrivateKey(kb)
	if err != nil {
		t.Fatal(err)
	}
	chain, _ := sign.ParseCertificates(cb)
	if err := sign.SignFile(filepath.Join(dir, "guestos.conf"), k, chain); err != nil {
		t.Fatal(err)
	}
}

func TestBadGuestOS(t *testing.T) {
	d := startDaemon(t)
	stranger := testutil.NewPKI(t, "ecdsa-p256", "stranger")
	vendorKey, _ := os.ReadFile(filepath.Join(pkiDir, "root-ca.key"))
	vendorCert, _ := os.ReadFile(filepath.Join(pkiDir, "root-ca.pem"))
	caKey, _ := sign.ParsePrivateKey(vendorKey)
	caCerts, _ := sign.ParseCertificates(vendorCert)
	signWith := func(dir string, o sign.CertOptions) {
		k, _ := sign.GenerateKey("ecdsa-p256")
		c, err := sign.Issue(caCerts[0], caKey, k.Public(), o)
		if err != nil {
			t.Fatal(err)
		}
		if err := sign.SignFile(filepath.Join(dir, "guestos.conf"), k, []*x509.Certificate{c}); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	cases := []struct {
		name   string
		tamper func(dir string)
		want   string
	}{
		{"flipped byte", func(dir string) {
			f, _ := os.OpenFile(filepath.Join(dir, "root.img"), os.O_RDWR, 0)
			b := make([]byte, 1)
			f.ReadAt(b, 4096)
			b[0] ^= 0xff
			f.WriteAt(b, 4096)
			f.Close()
		}, "SHA-256"},
		{"flipped byte in the last block", func(dir string) {
			f, _ := os.OpenFile(filepath.Join(dir, "root.img"), os.O_RDWR, 0)
			st, _ := f.Stat()
			b := make([]byte, 1)
			f.ReadAt(b, st.Size()-1)
			b[0] ^= 0x01
			f.WriteAt(b, st.Size()-1)
			f.Close()
		}, "SHA-256"},
		{"truncated image", func(dir string) { os.Truncate(filepath.Join(dir, "root.img"), 4096) }, "does not match the manifest"},
		{"manifest changed after signing", func(dir string) { editManifest(t, dir, `version: 1`, `version: 7`) }, "does not match the signed file"},
		{"untrusted CA", func(dir string) { stranger.SignFile(t, filepath.Join(dir, "guestos.conf")) }, "does not chain to a trusted CA"},
		{"expired signer", func(dir string) {
			signWith(dir, sign.CertOptions{CommonName: "expired", CodeSigning: true, NotBefore: now.AddDate(-2, 0, 0), NotAfter: now.AddDate(-1, 0, 0)})
		}, "expired"},
		{"not yet valid signer", func(dir string) {
			signWith(dir, sign.CertOptions{CommonName: "future", CodeSigning: true, NotBefore: now.AddDate(1, 0, 0), NotAfter: now.AddDate(2, 0, 0)})
		}, "not valid before"},
		{"signature over a different file", func(dir string) {
			// A genuine signature by the trusted signer, over other bytes.
			k, _ := sign.ParsePrivateKey(mustRead(t, filepath.Join(pkiDir, "signer.key")))
			sig, _ := sign.Sign(k, []byte("name: \"busybox\"\nversion: 1\n"))
			os.WriteFile(filepath.Join(dir, "guestos.conf.sig"), sig, 0o644)
		}, "does not match the signed file"},
		{"unsigned", func(dir string) { os.Remove(filepath.Join(dir, "guestos.conf.sig")) }, "signature"},
		{"oversized manifest", func(dir string) {
			editManifest(t, dir, `description:`, "# "+strings.Repeat("x", 70000)+"\ndescription:")
			resign(t, dir)
		}, "larger than"},
		{"oversized certificate chain", func(dir string) {
			os.WriteFile(filepath.Join(dir, "guestos.conf.cert"), bytes.Repeat(mustRead(t, filepath.Join(dir, "guestos.conf.cert")), 200), 0o644)
		}, "larger than"},
		{"image path escapes", func(dir string) {
			editManifest(t, dir, `image_file:`, `image_file: "../root.img" #`)
			resign(t, dir)
		}, "not a plain file name"},
		{"unknown manifest field", func(dir string) { editManifest(t, dir, `init_path:`, "bogus: 1\ninit_path:"); resign(t, dir) }, "unknown field"},
		{"verity root of another image", func(dir string) {
			editManifest(t, dir, `verity_root_hash: "`, `verity_root_hash: "00`)
			b := mustRead(t, filepath.Join(dir, "guestos.conf"))
			i := bytes.Index(b, []byte(`verity_root_hash: "00`)) + len(`verity_root_hash: "`) + 64
			os.WriteFile(filepath.Join(dir, "guestos.conf"), append(b[:i:i], b[i+2:]...), 0o644)
			resign(t, dir)
		}, "verity root hash"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyGuestOS(t, d)
			tc.tamper(dir)
			before := snapshot(t, d.stateDir)
			msg := d.refuse(tc.want, "guestos", "install", dir)
			if after := snapshot(t, d.stateDir); after != before {
				t.Errorf("refused install changed the store:\n%s", after)
			}
			if !strings.Contains(d.auditLines()[len(d.auditLines())-1], `"outcome":"failure"`) {
				t.Errorf("refusal not audited (%s)", msg)
			}
		})
	}
	d.installGuestOS()
	// Retrying the identical install (a client that lost its connection)
	// is success; item 11.
	d.installGuestOS()
	userConf := d.signedConfig("user", "name: \"user\"\nguest_os: \"busybox\"\n")
	d.must("create", userConf)
	d.must("create", userConf) // the identical signed config again: success
	d.refuse("used by container(s) user", "guestos", "remove", "busybox", "1")
}

func mustRead(t *testing.T, p string) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func editManifest(t *testing.T, dir, old, new string) {
	p := filepath.Join(dir, "guestos.conf")
	b, err := os.ReadFile(p)
	// prototext output varies its spacing on purpose; normalize first.
	b = bytes.ReplaceAll(b, []byte(":  "), []byte(": "))
	if err != nil || !strings.Contains(string(b), old) {
		t.Fatalf("manifest lacks %q", old)
	}
	os.WriteFile(p, []byte(strings.Replace(string(b), old, new, 1)), 0o644)
}

// Item 9: values an attacker sizes (a 60,000-byte name, a 60,000-byte
// path) are not echoed whole into errors or the audit trail.
func TestHugeValuesAreNotEchoed(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	huge := strings.Repeat("n", 60000)
	for _, args := range [][]string{
		{"start", huge},
		{"remove", huge},
		{"guestos", "install", "/" + huge},
		{"ca", "crl", "remove", huge},
	} {
		msg := d.refuse("", args...)
		if len(msg) > 1024 {
			t.Errorf("cmlctl %s: error of %d bytes", args[0], len(msg))
		}
	}
	for _, l := range d.auditLines() {
		if len(l) > 4096 {
			t.Errorf("audit record of %d bytes: %.200s...", len(l), l)
		}
	}
}
