package guestos

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/testutil"
	"github.com/cmlproject/cml/internal/trust"
	"github.com/cmlproject/cml/internal/verity"
)

// bundle writes a signed guest OS directory with one random image of
// blocks verity blocks.
func makeBundle(t *testing.T, p *testutil.PKI, name string, version int, blocks int) string {
	dir := t.TempDir()
	img := make([]byte, blocks*verity.BlockSize)
	rand.Read(img)
	os.WriteFile(filepath.Join(dir, "root.img"), img, 0o644)
	sum := sha256.Sum256(img)
	salt := []byte("salt-salt-salt-salt-salt-salt-32")
	tree, err := verity.Build(bytes.NewReader(img), int64(len(img)), salt, 0)
	if err != nil {
		t.Fatal(err)
	}
	m := fmt.Sprintf("name: %q\nversion: %d\nmounts { image_file: \"root.img\" mount_point: \"/\" fs_type: \"erofs\" image_size: %d image_sha2_256: %q verity_root_hash: %q verity_salt: %q }\n",
		name, version, len(img), hex.EncodeToString(sum[:]), hex.EncodeToString(tree.Root), hex.EncodeToString(salt))
	os.WriteFile(filepath.Join(dir, ManifestFile), []byte(m), 0o644)
	p.SignFile(t, filepath.Join(dir, ManifestFile))
	return dir
}

func openStore(t *testing.T, p *testutil.PKI) (*Store, *trust.Store) {
	state := t.TempDir()
	p.Provision(t, state)
	ts, err := trust.Open(filepath.Join(state, "trust"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := Open(filepath.Join(state, "guestos"), Options{Trust: ts})
	if err != nil {
		t.Fatal(err)
	}
	return s, ts
}

// storeEntries lists what the store holds besides the rollback record.
func storeEntries(t *testing.T, s *Store) []string {
	ents, _ := os.ReadDir(s.dir)
	var out []string
	for _, e := range ents {
		if e.Name() != versionsFile {
			out = append(out, e.Name())
		}
	}
	return out
}

func TestInstallRefusesTamperingAndLeavesNothing(t *testing.T) {
	p := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	s, _ := openStore(t, p)
	ctx := context.Background()
	other := testutil.NewPKI(t, "ed25519", "stranger")
	cases := map[string]func(dir string){
		"flipped image byte": func(dir string) {
			b, _ := os.ReadFile(filepath.Join(dir, "root.img"))
			b[5000] ^= 1
			os.WriteFile(filepath.Join(dir, "root.img"), b, 0o644)
		},
		"truncated image": func(dir string) { os.Truncate(filepath.Join(dir, "root.img"), 4096) },
		"manifest changed after signing": func(dir string) {
			b, _ := os.ReadFile(filepath.Join(dir, ManifestFile))
			os.WriteFile(filepath.Join(dir, ManifestFile), bytes.Replace(b, []byte("version: 1"), []byte("version: 9"), 1), 0o644)
		},
		"untrusted CA": func(dir string) { other.SignFile(t, filepath.Join(dir, ManifestFile)) },
		"signature over another file": func(dir string) {
			o := filepath.Join(t.TempDir(), "x")
			os.WriteFile(o, []byte("something else"), 0o644)
			p.SignFile(t, o)
			b, _ := os.ReadFile(o + sign.SigSuffix)
			os.WriteFile(filepath.Join(dir, ManifestFile+sign.SigSuffix), b, 0o644)
		},
		"no signature": func(dir string) { os.Remove(filepath.Join(dir, ManifestFile+sign.SigSuffix)) },
		"oversized chain": func(dir string) {
			os.WriteFile(filepath.Join(dir, ManifestFile+sign.CertSuffix), bytes.Repeat([]byte("A"), sign.MaxChainSize+1), 0o644)
		},
		"expired signer": func(dir string) {
			c, k := p.Issue(t, sign.CertOptions{CommonName: "old", CodeSigning: true, NotBefore: time.Now().AddDate(-2, 0, 0), NotAfter: time.Now().AddDate(-1, 0, 0)})
			if err := sign.SignFile(filepath.Join(dir, ManifestFile), k, []*x509.Certificate{c}); err != nil {
				t.Fatal(err)
			}
		},
		"signer without codeSigning": func(dir string) {
			c, k := p.Issue(t, sign.CertOptions{CommonName: "tls", NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().AddDate(1, 0, 0)})
			sign.SignFile(filepath.Join(dir, ManifestFile), k, []*x509.Certificate{c})
		},
	}
	for name, tamper := range cases {
		dir := makeBundle(t, p, "g", 1, 40)
		tamper(dir)
		_, err := s.Install(ctx, dir, nil)
		if err == nil {
			t.Errorf("%s: installed", name)
			continue
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: multi-line error %q", name, err)
		}
		if left := storeEntries(t, s); len(left) != 0 {
			t.Errorf("%s: store holds %v after a refused install", name, left)
		}
		t.Logf("%s: %v", name, err)
	}
	if _, err := s.Install(ctx, makeBundle(t, p, "g", 1, 40), nil); err != nil {
		t.Fatalf("intact bundle refused: %v", err)
	}
}

func TestRollbackProtectionSurvivesRemovalAndRestart(t *testing.T) {
	p := testutil.NewPKI(t, "ecdsa-p384", "vendor")
	s, ts := openStore(t, p)
	ctx := context.Background()
	for _, v := range []int{1, 3} {
		if _, err := s.Install(ctx, makeBundle(t, p, "g", v, 3), nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Install(ctx, makeBundle(t, p, "g", 2, 3), nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("downgrade to 2 below 3: %v", err)
	}
	if err := s.Remove("g", 3); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(s.dir, Options{Trust: ts})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Install(ctx, makeBundle(t, p, "g", 2, 3), nil); err == nil || !strings.Contains(err.Error(), "rollback") {
		t.Fatalf("downgrade after removing the newer version and restarting: %v", err)
	}
	if _, err := s2.Install(ctx, makeBundle(t, p, "g", 3, 3), nil); err != nil {
		t.Fatalf("reinstalling the highest version: %v", err)
	}
	if g, err := s2.Get("g", 1); err != nil || g.Version() != 1 {
		t.Fatalf("pinned version 1: %v", err)
	}
}

func TestCheckBeforeStart(t *testing.T) {
	p := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	s, ts := openStore(t, p)
	ctx := context.Background()
	g, err := s.Install(ctx, makeBundle(t, p, "g", 1, 300), nil)
	if err != nil {
		t.Fatal(err)
	}
	f, err := s.Check(ctx, g)
	if err != nil {
		t.Fatalf("intact guest OS: %v", err)
	}
	f.Close()
	// An attacker with root-equivalent write access changes two blocks of
	// the installed image.
	img := filepath.Join(g.Dir, "root.img")
	os.Chmod(img, 0o600)
	b, _ := os.ReadFile(img)
	b[10*verity.BlockSize] ^= 1
	b[11*verity.BlockSize+7] ^= 1
	os.WriteFile(img, b, 0o400)
	_, err = s.Check(ctx, g)
	if err == nil || !strings.Contains(err.Error(), "data blocks 10-11") {
		t.Fatalf("tampered image: %v", err)
	}
	b[10*verity.BlockSize] ^= 1
	b[11*verity.BlockSize+7] ^= 1
	os.WriteFile(img, b, 0o400)
	// Revoking the signer stops the next start.
	crl, err := sign.RevocationList(p.Root, p.RootKey, []*x509.Certificate{p.Signer}, 1, time.Now().Add(-time.Minute), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.AddCRL(crl, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Check(ctx, g); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked signer: %v", err)
	}
}

func TestOpenSweepsStaleStaging(t *testing.T) {
	p := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	s, ts := openStore(t, p)
	os.MkdirAll(filepath.Join(s.dir, stagingPrefix+"123", "x"), 0o700)
	if _, err := Open(s.dir, Options{Trust: ts}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.dir, stagingPrefix+"123")); !os.IsNotExist(err) {
		t.Error("stale staging directory survived Open (a crash mid-install would leave it)")
	}
}

// TestDMVerityRefusesTamperedBlocks maps a guest OS image through
// dm-verity, as cmld does on hosts with device-mapper, changes one block
// underneath, and expects reading it to fail.
func TestDMVerityRefusesTamperedBlocks(t *testing.T) {
	testutil.RequireRoot(t)
	if !DMVerityAvailable() {
		t.Skip("needs device-mapper (/dev/mapper/control) and veritysetup; this kernel has no device-mapper, so cmld verifies images in full before each start instead (TestCheckBeforeStart)")
	}
	p := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	s, _ := openStore(t, p)
	s.o.DMVerity = true
	ctx := context.Background()
	g, err := s.Install(ctx, makeBundle(t, p, "g", 1, 64), nil)
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(g.Dir, "root.img")
	os.Chmod(img, 0o600)
	f, _ := os.OpenFile(img, os.O_RDWR, 0)
	f.WriteAt([]byte{0xff, 0xfe}, 20*verity.BlockSize+3)
	f.Close()
	name := fmt.Sprintf("cml-test-%d", os.Getpid())
	dev, err := s.OpenVerity(ctx, g, name)
	if err != nil {
		t.Fatal(err)
	}
	defer CloseVerity(name)
	d, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := make([]byte, verity.BlockSize)
	if _, err := d.ReadAt(buf, 0); err != nil {
		t.Fatalf("intact block 0: %v", err)
	}
	if _, err := d.ReadAt(buf, 20*verity.BlockSize); err == nil {
		t.Fatal("tampered block 20 read without error through dm-verity")
	}
}
