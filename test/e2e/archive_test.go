package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
)

// TestAuditArchiveFreesAFullTrail: with a 1 MB trail and when_full
// FAIL_CLOSED, audited calls are refused once it is full; an
// administrator who is no auditor cannot export or archive it; an
// archive whose SHA-256 does not match the trail rotates nothing; root (an
// auditor) archives it: the copy verifies with cmlverify and the device
// certificate, the device's trail is freed, names the auditor in its
// rotation record, verifies, and takes calls again.
func TestAuditArchiveFreesAFullTrail(t *testing.T) {
	d := startDaemon(t)
	d.args = []string{"--socket-group", "nogroup"}
	d.restartWithDevice("audit { audit_size: 1 }\n")
	d.must("user", "add", "adm", "--role", "administrator", "--uid", "65534")
	conn, err := grpc.NewClient("unix://"+d.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := cmlv1.NewControlClient(conn)
	ctx := context.Background()
	long := strings.Repeat("n", 250)
	full := false
	for i := 0; i < 10000 && !full; i++ {
		_, err := c.Start(ctx, &cmlv1.ContainerRef{NameOrUuid: proto.String(long)})
		full = err != nil && strings.Contains(err.Error(), "audit trail is full")
	}
	if !full {
		t.Fatal("the 1 MB trail did not fill up")
	}
	d.refuse("audit trail is full", "user", "policy", "--min-length", "14")
	out := filepath.Join(d.root, "archive")
	if o, code := d.asUser(65534, "audit", "archive", "--out", "/tmp"); code == 0 || !strings.Contains(o, "may not call AuditExport") {
		t.Errorf("an administrator who is no auditor: %d %s", code, o)
	}
	if _, err := c.AuditArchive(ctx, &cmlv1.AuditArchiveRequest{Size: proto.Uint64(1000), Sha256: proto.String(strings.Repeat("00", 32))}); err == nil || !strings.Contains(err.Error(), "export again") {
		t.Errorf("an archive that does not match: %v", err)
	}
	o := d.must("audit", "archive", "--out", out)
	if !strings.Contains(o, "the device rotated away") {
		t.Fatalf("audit archive: %s", o)
	}
	copies, _ := filepath.Glob(filepath.Join(out, "audit-*.log"))
	if len(copies) != 1 {
		t.Fatalf("archive files: %v", copies)
	}
	v := exec.Command(filepath.Join(binDir, "cmlverify"), "audit", "--cert", filepath.Join(d.stateDir, "identity", "tls.pem"), copies[0])
	if vo, err := v.CombinedOutput(); err != nil {
		t.Errorf("cmlverify audit on the archived copy: %v %s", err, vo)
	}
	d.must("user", "policy", "--min-length", "14")
	if vo := d.must("audit", "verify"); !strings.Contains(vo, "audit trail OK") {
		t.Errorf("the device's trail after the archive: %s", vo)
	}
	if !d.hasAudit("audit.rotate", "success", "auditor root archived them") {
		t.Error("the rotation record does not name the auditor")
	}
	st, _ := os.Stat(filepath.Join(d.stateDir, "audit.log"))
	if st.Size() > 64<<10 {
		t.Errorf("the trail still holds %d bytes", st.Size())
	}
}
