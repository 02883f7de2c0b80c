package attest

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
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/device"
	"github.com/cmlproject/cml/internal/measurelog"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/testutil"
	"github.com/cmlproject/cml/internal/tpm"
	"github.com/cmlproject/cml/internal/tpmtest"
	"github.com/cmlproject/cml/internal/trust"
)

var (
	rootA = strings.Repeat("a1", 32)
	rootB = strings.Repeat("b2", 32)
)

// fixture is a device (TPM, identity, measurement log) plus the verifier's
// side: a fleet CA that certified the device's attestation key, and
// reference values signed under a vendor CA.
type fixture struct {
	vendor, fleet *testutil.PKI
	id            *device.Identity
	m             *tpm.Measurer
	refs          string
	web           []byte // the signed config text of container "web"
	vf            *Verifier
}

func newFixture(t testing.TB, rw io.ReadWriteCloser) *fixture {
	return newFixtureWithLog(t, rw, nil)
}

// newFixtureWithLog lets prefill write a measurement log (and extend the
// PCR to match) before the device opens it.
func newFixtureWithLog(t testing.TB, rw io.ReadWriteCloser, prefill func(logPath string)) *fixture {
	t.Helper()
	f := &fixture{vendor: testutil.NewPKI(t, "ecdsa-p256", "vendor"), fleet: testutil.NewPKI(t, "ecdsa-p256", "fleet")}
	keys, err := tpm.EnsureKeys(rw)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if prefill != nil {
		prefill(filepath.Join(dir, "log.cel"))
	}
	if f.m, err = tpm.NewMeasurer(rw, tpm.DefaultPCR, filepath.Join(dir, "log.cel")); err != nil {
		t.Fatal(err)
	}
	sink, err := audit.OpenFile(filepath.Join(dir, "audit.log"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sink.Close() })
	if f.id, err = device.Open(device.Options{Dir: filepath.Join(dir, "identity"), Keys: keys, Measurer: f.m, Audit: sink}); err != nil {
		t.Fatal(err)
	}
	f.id.InstallCert(context.Background(), f.issueAK(t, f.fleet, time.Now().AddDate(1, 0, 0), true), false)

	// Reference values: busybox 3 with root hash rootA, and config "web".
	f.refs = t.TempDir()
	bundle := filepath.Join(f.refs, "busybox-3")
	os.MkdirAll(bundle, 0o755)
	manifest := fmt.Sprintf("name: \"busybox\"\nversion: 3\nmounts { image_file: \"root.img\" mount_point: \"/\" fs_type: \"erofs\" image_size: 4096 image_sha2_256: %q verity_root_hash: %q verity_salt: %q }\n",
		strings.Repeat("00", 32), rootA, strings.Repeat("11", 32))
	os.WriteFile(filepath.Join(bundle, "guestos.conf"), []byte(manifest), 0o644)
	f.vendor.SignFile(t, filepath.Join(bundle, "guestos.conf"))
	f.web = []byte("name: \"web\"\nguest_os: \"busybox\"\n")
	os.WriteFile(filepath.Join(f.refs, "web.conf"), f.web, 0o644)
	f.vendor.SignFile(t, filepath.Join(f.refs, "web.conf"))
	ref, err := LoadReference(trust.FromRoots([]*x509.Certificate{f.vendor.Root}), f.refs)
	if err != nil {
		t.Fatal(err)
	}
	if ref.Images() != 1 || ref.Configs() != 1 {
		t.Fatalf("reference: %d images, %d configs", ref.Images(), ref.Configs())
	}
	pool := x509.NewCertPool()
	pool.AddCert(f.fleet.Root)
	f.vf = &Verifier{FleetRoots: pool, Reference: ref}
	return f
}

// issueAK has ca certify the device's attestation key from its CSR, as
// cmlsign pki device does.
func (f *fixture) issueAK(t testing.TB, ca *testutil.PKI, notAfter time.Time, akUsage bool) []byte {
	t.Helper()
	b, err := f.id.CSR(cmlv1.DeviceCSRRequest_ATTESTATION)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	csr, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	o := sign.CertOptions{CommonName: csr.Subject.CommonName, URIs: csr.URIs, AttestationKey: akUsage, NotBefore: time.Now().Add(-2 * time.Hour), NotAfter: notAfter}
	if !akUsage {
		o.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	c, err := sign.Issue(ca.Root, ca.RootKey, csr.PublicKey, o)
	if err != nil {
		t.Fatal(err)
	}
	return sign.EncodeCertificates(c)
}

func (f *fixture) start(t testing.TB, uuid, name, verityRoot string, cfg []byte) {
	t.Helper()
	sum := sha256.Sum256(cfg)
	if err := f.m.Measure(t.Context(), tpm.Event{Container: uuid, Name: name, GuestOS: "busybox", Version: 3, VerityRoot: verityRoot, ConfigSHA256: hex.EncodeToString(sum[:])}); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) attest(t testing.TB, nonce []byte) *cmlv1.Attestation {
	t.Helper()
	a, err := f.id.Attest(nonce, nil)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestVerifyAcceptsHonestDevice(t *testing.T) {
	f := newFixture(t, tpmtest.Simulator(t))
	f.start(t, "u1", "web", rootA, f.web)
	f.start(t, "u1", "web", rootA, f.web)
	nonce := []byte("0123456789abcdef")
	v := f.vf.Verify(f.attest(t, nonce), nonce)
	if !v.OK {
		t.Fatalf("honest device rejected: %s", v.Reason())
	}
	if len(v.Containers) != 1 || v.Containers[0].Starts != 2 || !v.Containers[0].OK {
		t.Fatalf("containers: %+v", v.Containers)
	}
}

// TestVerifyRejectsAttacks takes an honest answer and changes it as an
// attacker would; each change must fail with the named check, never
// crash.
func TestVerifyRejectsAttacks(t *testing.T) {
	f := newFixture(t, tpmtest.Simulator(t))
	for i := 0; i < 3; i++ {
		f.start(t, fmt.Sprint("u", i), fmt.Sprint("c", i), rootA, f.web)
	}
	nonce := []byte("fresh-nonce-0001")
	good := f.attest(t, nonce)
	if v := f.vf.Verify(good, nonce); !v.OK {
		t.Fatalf("baseline: %s", v.Reason())
	}
	old := f.attest(t, []byte("older-nonce-0000"))
	log, _ := tpm.DecodeLog(good.GetEventLog())
	encode := func(recs []measurelog.Record) []byte {
		var b bytes.Buffer
		(&measurelog.Log{Records: recs}).EncodeCEL(&b)
		return b.Bytes()
	}
	// A forged record with a correct digest for its own content.
	forged := measurelog.Log{}
	ev := tpm.Event{Container: "evil", Name: "evil", GuestOS: "busybox", Version: 3, VerityRoot: rootA}
	d, _ := ev.GenerateDigest(crypto.SHA256)
	tlv, _ := ev.GetTLV()
	forged.Records = append(forged.Records, measurelog.Record{RecNum: 99, Index: tpm.DefaultPCR, IndexType: measurelog.PCRTypeValue, Digests: map[crypto.Hash][]byte{crypto.SHA256: d}, Content: tlv})

	otherCA := testutil.NewPKI(t, "ecdsa-p256", "other fleet")
	cases := []struct {
		name   string
		mutate func(a *cmlv1.Attestation)
		nonce  []byte
		check  string
	}{
		{"replayed nonce", func(a *cmlv1.Attestation) {
			a.Quote, a.Signature, a.Pcrs, a.EventLog = old.Quote, old.Signature, old.Pcrs, old.EventLog
		}, nonce, "nonce"},
		{"wrong nonce", nil, []byte("another-nonce-00"), "nonce"},
		{"event inserted", func(a *cmlv1.Attestation) {
			a.EventLog = encode(append([]measurelog.Record{log.Records[0], forged.Records[0]}, log.Records[1:]...))
		}, nonce, "log"},
		{"event removed", func(a *cmlv1.Attestation) { a.EventLog = encode(log.Records[1:]) }, nonce, "log"},
		{"events reordered", func(a *cmlv1.Attestation) {
			r := append([]measurelog.Record{}, log.Records...)
			r[0], r[1] = r[1], r[0]
			a.EventLog = encode(r)
		}, nonce, "log"},
		{"PCR value changed", func(a *cmlv1.Attestation) { a.Pcrs[0].Sha256 = bytes.Repeat([]byte{1}, 32) }, nonce, "pcrs"},
		{"PCR value missing", func(a *cmlv1.Attestation) { a.Pcrs = nil }, nonce, "pcrs"},
		{"quote altered", func(a *cmlv1.Attestation) { a.Quote[len(a.Quote)-1] ^= 1 }, nonce, "signature"},
		{"quote truncated", func(a *cmlv1.Attestation) { a.Quote = a.Quote[:20] }, nonce, "signature"},
		{"signature truncated", func(a *cmlv1.Attestation) { a.Signature = a.Signature[:10] }, nonce, "signature"},
		{"untrusted device certificate", func(a *cmlv1.Attestation) {
			a.AttestationCertificate = f.issueAK(t, otherCA, time.Now().AddDate(1, 0, 0), true)
		}, nonce, "certificate"},
		{"expired device certificate", func(a *cmlv1.Attestation) {
			a.AttestationCertificate = f.issueAK(t, f.fleet, time.Now().Add(-time.Hour), true)
		}, nonce, "certificate"},
		{"TLS-style certificate for the quote key", func(a *cmlv1.Attestation) {
			a.AttestationCertificate = f.issueAK(t, f.fleet, time.Now().AddDate(1, 0, 0), false)
		}, nonce, "certificate"},
		{"no certificate", func(a *cmlv1.Attestation) { a.AttestationCertificate = nil }, nonce, "certificate"},
		{"device UUID swapped", func(a *cmlv1.Attestation) { a.DeviceUuid = proto.String("00000000-0000-4000-8000-000000000000") }, nonce, "certificate"},
		{"oversized log", func(a *cmlv1.Attestation) { a.EventLog = make([]byte, tpm.MaxLog+1) }, nonce, "log"},
		{"garbage log", func(a *cmlv1.Attestation) { a.EventLog = []byte{1, 2, 3} }, nonce, "log"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := proto.Clone(good).(*cmlv1.Attestation)
			if c.mutate != nil {
				c.mutate(a)
			}
			v := f.vf.Verify(a, c.nonce)
			if v.OK {
				t.Fatal("accepted")
			}
			if !strings.HasPrefix(v.Reason(), c.check+":") {
				t.Fatalf("failed for the wrong reason: %s", v.Reason())
			}
		})
	}
	// Random corruption of every field: a failing verdict, never a panic.
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 500; i++ {
		a := proto.Clone(good).(*cmlv1.Attestation)
		for _, b := range [][]byte{a.Quote, a.Signature, a.EventLog, a.AttestationCertificate} {
			if len(b) > 0 && r.IntN(2) == 0 {
				b[r.IntN(len(b))] ^= byte(1 + r.IntN(255))
			}
		}
		if r.IntN(4) == 0 {
			a.Quote = a.Quote[:r.IntN(len(a.Quote))]
		}
		f.vf.Verify(a, nonce)
	}
}

// TestVerifyNamesUnknownImageAndConfig measures a start of an image no
// signed manifest names, and one with an unsigned config.
func TestVerifyNamesUnknownImageAndConfig(t *testing.T) {
	f := newFixture(t, tpmtest.Simulator(t))
	f.start(t, "u1", "web", rootA, f.web)
	f.start(t, "u2", "rogue", rootB, f.web)
	f.start(t, "u3", "edited", rootA, append([]byte("# edited\n"), f.web...))
	nonce := []byte("nonce-for-images")
	v := f.vf.Verify(f.attest(t, nonce), nonce)
	if v.OK {
		t.Fatal("accepted a device running an unknown image")
	}
	for _, c := range v.Checks {
		if !c.OK {
			t.Errorf("check %s failed; only containers should: %s", c.Name, c.Detail)
		}
	}
	want := map[string]string{"web": "", "rogue": "no trusted signed manifest", "edited": "not among the trusted signed configs"}
	for _, c := range v.Containers {
		if w := want[c.Name]; c.OK != (w == "") || !strings.Contains(c.Detail, w) {
			t.Errorf("container %s: ok %t, %q", c.Name, c.OK, c.Detail)
		}
	}
}

// TestQuoteFromAnotherDevice: device B's quote presented with device A's
// certificate fails the signature check; B's whole answer fails when the
// verifier expects A.
func TestQuoteFromAnotherDevice(t *testing.T) {
	a := newFixture(t, tpmtest.Simulator(t))
	bConn, _ := tpmtest.Swtpm(t)
	b := newFixture(t, bConn)
	b.vf = a.vf // same fleet for this case: certify B under A's fleet CA
	b.id.InstallCert(context.Background(), b.issueAK(t, a.fleet, time.Now().AddDate(1, 0, 0), true), false)
	nonce := []byte("nonce-two-device")
	ansA, ansB := a.attest(t, nonce), b.attest(t, nonce)
	mixed := proto.Clone(ansA).(*cmlv1.Attestation)
	mixed.Quote, mixed.Signature, mixed.Pcrs, mixed.EventLog = ansB.Quote, ansB.Signature, ansB.Pcrs, ansB.EventLog
	if v := a.vf.Verify(mixed, nonce); v.OK || !strings.HasPrefix(v.Reason(), "signature:") {
		t.Errorf("B's quote under A's certificate: %s", v.Reason())
	}
	vf := *a.vf
	vf.Device = a.id.UUID()
	if v := vf.Verify(ansB, nonce); v.OK || !strings.HasPrefix(v.Reason(), "certificate:") {
		t.Errorf("B's answer where A was expected: ok %t %s", v.OK, v.Reason())
	}
	if v := a.vf.Verify(ansB, nonce); !v.OK {
		t.Errorf("B's honest answer (no device expected): %s", v.Reason())
	}
}

// TestTpm2CheckquoteAgrees hands the same quote to tpm2-tools'
// tpm2_checkquote, an independent verifier: signature, nonce and the PCR
// values tpm2-tools reads from the TPM itself.
func TestTpm2CheckquoteAgrees(t *testing.T) {
	testutil.RequireTool(t, "tpm2_checkquote", "tpm2_pcrread")
	conn, sock := tpmtest.Swtpm(t)
	f := newFixture(t, conn)
	f.start(t, "u1", "web", rootA, f.web)
	nonce := []byte("tpm2-tools-nonce")
	a := f.attest(t, nonce)
	if v := f.vf.Verify(a, nonce); !v.OK {
		t.Fatal(v.Reason())
	}
	dir := t.TempDir()
	certs, _ := sign.ParseCertificates(a.AttestationCertificate)
	pub, _ := sign.PublicKeyPEM(certs[0].PublicKey)
	files := map[string][]byte{"ak.pem": pub, "quote.bin": a.Quote, "sig.bin": a.Signature}
	for n, b := range files {
		os.WriteFile(filepath.Join(dir, n), b, 0o600)
	}
	conn.Close() // swtpm serves one client at a time
	tcti := "TPM2TOOLS_TCTI=swtpm:path=" + sock
	pcr := exec.Command("tpm2_pcrread", "sha256:11", "-o", filepath.Join(dir, "pcrs.bin"))
	pcr.Env = append(os.Environ(), tcti)
	if out, err := pcr.CombinedOutput(); err != nil {
		t.Fatalf("tpm2_pcrread: %v\n%s", err, out)
	}
	check := func(nonceHex string) error {
		cmd := exec.Command("tpm2_checkquote", "-u", filepath.Join(dir, "ak.pem"), "-m", filepath.Join(dir, "quote.bin"),
			"-s", filepath.Join(dir, "sig.bin"), "-f", filepath.Join(dir, "pcrs.bin"), "-l", "sha256:11", "-g", "sha256", "-q", nonceHex)
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	if err := check(hex.EncodeToString(nonce)); err != nil {
		t.Fatalf("tpm2_checkquote rejects our quote: %v", err)
	}
	if err := check(hex.EncodeToString([]byte("another-nonce-00"))); err == nil {
		t.Fatal("tpm2_checkquote accepted a wrong nonce: the interop check proves nothing")
	}
}

// TestReadAnswerBounds: truncated and oversized answer files are refused
// with one line.
func TestReadAnswerBounds(t *testing.T) {
	f := newFixture(t, tpmtest.Simulator(t))
	nonce := []byte("nonce-for-files!")
	b, _ := protojson.Marshal(f.attest(t, nonce))
	dir := t.TempDir()
	good := filepath.Join(dir, "good.json")
	os.WriteFile(good, b, 0o600)
	if a, err := ReadAnswer(good); err != nil || !f.vf.Verify(a, nonce).OK {
		t.Fatalf("good answer: %v", err)
	}
	trunc := filepath.Join(dir, "trunc.json")
	os.WriteFile(trunc, b[:len(b)/2], 0o600)
	if _, err := ReadAnswer(trunc); err == nil || strings.Contains(err.Error(), "\n") {
		t.Errorf("truncated answer: %v", err)
	}
	big := filepath.Join(dir, "big.json")
	os.WriteFile(big, append(b, make([]byte, MaxAnswer)...), 0o600)
	if _, err := ReadAnswer(big); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("oversized answer: %v", err)
	}
}

// TestBootPolicy: a boot PCR the policy pins must be quoted and hold the
// pinned value.
func TestBootPolicy(t *testing.T) {
	f := newFixture(t, tpmtest.Simulator(t))
	nonce := []byte("nonce-for-policy")
	a, err := f.id.Attest(nonce, []uint32{0})
	if err != nil {
		t.Fatal(err)
	}
	var pcr0 []byte
	for _, p := range a.GetPcrs() {
		if p.GetIndex() == 0 {
			pcr0 = p.GetSha256()
		}
	}
	f.vf.Policy = map[int][]byte{0: pcr0}
	if v := f.vf.Verify(a, nonce); !v.OK {
		t.Fatalf("matching policy: %s", v.Reason())
	}
	f.vf.Policy = map[int][]byte{0: bytes.Repeat([]byte{7}, 32)}
	if v := f.vf.Verify(a, nonce); v.OK || !strings.HasPrefix(v.Reason(), "policy:") {
		t.Errorf("PCR 0 off the policy: %s", v.Reason())
	}
	f.vf.Policy = map[int][]byte{7: pcr0}
	if v := f.vf.Verify(a, nonce); v.OK || !strings.HasPrefix(v.Reason(), "policy:") {
		t.Errorf("policy PCR not quoted: %s", v.Reason())
	}
}
