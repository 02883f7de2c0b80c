package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/testutil"
)

// TestBackupAndRestore (CR 7.3, 7.3(1), 7.4, OS-06): an administrator's
// backup is encrypted to the owner's recipient only and signed by the
// device key — opened and checked with age, tar, openssl and sha256sum
// alone — and holds the container's config as signed, the owner CA and
// the accounts. After they are removed, a dry run changes nothing and a
// restore brings them back (the container starts: its config verified
// again). Attacks: a backup whose config was changed and re-encrypted to
// the owner's public recipient, and a backup signed by another key with
// an unsigned container added, are refused and change nothing; another
// identity cannot open a backup; a user may not make one.
func TestBackupAndRestore(t *testing.T) {
	testutil.RequireTool(t, "age", "age-keygen", "openssl", "sha256sum", "tar")
	d := startDaemon(t)
	d.installGuestOS()
	d.create("web", "")
	d.refuse("no backup recipient configured", "backup", "create", "--out", filepath.Join(d.root, "none.cmlbackup"))

	run := func(dir, script string) string {
		t.Helper()
		cmd := exec.Command("sh", "-c", script)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", script, err, out)
		}
		return string(out)
	}
	key := filepath.Join(d.root, "owner.key")
	run(d.root, "age-keygen -o owner.key 2>/dev/null; age-keygen -o other.key 2>/dev/null")
	recipient := strings.TrimSpace(run(d.root, "age-keygen -y owner.key"))
	d.restartWithDevice("backup { recipients: \"" + recipient + "\" }\n")
	owner := newTestCA(t, d.root, "owner-ca")
	d.must("ca", "register", owner.pem)
	d.must("user", "add", "op", "--role", "user", "--uid", "4242", "--container", "web")

	file := filepath.Join(d.root, "device.cmlbackup")
	out := d.must("backup", "create", "--out", file)
	if !strings.Contains(out, "sha256 ") {
		t.Errorf("backup create: %q", out)
	}
	if !d.hasAudit("control.Backup", "success", "sha256") {
		t.Error("no audit record of the backup")
	}
	// Independent check: age, tar, openssl, sha256sum.
	x := filepath.Join(d.root, "x")
	os.Mkdir(x, 0o700)
	run(x, "age -d -i "+key+" "+file+" | tar -x")
	run(x, "openssl x509 -in device.pem -pubkey -noout -out pub.pem && openssl dgst -sha256 -verify pub.pem -signature MANIFEST.sig MANIFEST")
	run(x, "sha256sum --strict -c MANIFEST")
	devCert := filepath.Join(d.stateDir, "identity", "tls.pem")
	if a, b := mustRead(t, filepath.Join(x, "device.pem")), mustRead(t, devCert); !bytes.Equal(a, b) {
		t.Error("the backup's device.pem is not the device's TLS certificate")
	}
	if a, b := mustRead(t, filepath.Join(x, "containers/web/config.conf")), mustRead(t, filepath.Join(d.root, "web.conf")); !bytes.Equal(a, b) {
		t.Error("the backup's config of web is not the signed file")
	}
	for _, f := range []string{"containers/web/config.conf.sig", "access/accounts.json", "guestos/installed.txt", "device.conf"} {
		if _, err := os.Stat(filepath.Join(x, f)); err != nil {
			t.Errorf("the backup lacks %s", f)
		}
	}
	if ents, _ := filepath.Glob(filepath.Join(x, "trust/owner/*.pem")); len(ents) != 1 {
		t.Errorf("owner CAs in the backup: %v", ents)
	}
	if !strings.Contains(d.must("backup", "show", file, "--identity", key, "--device-cert", devCert), "containers/web/config.conf") {
		t.Error("backup show does not list the config")
	}
	d.refuse("decrypt the backup", "backup", "show", file, "--identity", filepath.Join(d.root, "other.key"))

	// Lose the configuration, then take it back.
	d.must("remove", "web")
	d.must("user", "remove", "op")
	for _, l := range strings.Split(d.must("ca", "list"), "\n") {
		if strings.Contains(l, "owner-ca") {
			d.must("ca", "remove", strings.Fields(l)[1])
		}
	}
	out = d.must("backup", "restore", file, "--identity", key, "--dry-run")
	if !strings.Contains(out, "container web") || !strings.Contains(out, "would restore") {
		t.Errorf("dry run:\n%s", out)
	}
	if strings.Contains(d.must("list"), "web") || strings.Contains(d.must("ca", "list"), "owner-ca") {
		t.Fatal("a dry run changed the device")
	}

	// Attacks first, while nothing is restored.
	tampered := filepath.Join(d.root, "tampered.cmlbackup")
	run(x, "printf 'privileged: true\\n' >> containers/web/config.conf && tar -cf ../t.tar MANIFEST MANIFEST.sig device.pem $(sed 's/^[0-9a-f]*  //' MANIFEST) && age -r "+recipient+" -o "+tampered+" ../t.tar")
	t.Logf("changed config: %s", d.refuse("does not match its signed sum", "backup", "restore", tampered, "--identity", key))
	forged := filepath.Join(d.root, "forged.cmlbackup")
	y := filepath.Join(d.root, "y")
	os.Mkdir(y, 0o700)
	run(y, "tar -xf ../t.tar && mkdir -p containers/evil && printf 'name: \"evil\"\\nguest_os: \"busybox\"\\n' > containers/evil/config.conf"+
		" && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout k.pem -out device.pem -subj '/CN=not the device' -days 1 2>/dev/null"+
		" && find . -type f ! -name MANIFEST ! -name MANIFEST.sig ! -name device.pem ! -name k.pem | sed 's|^\\./||' | sort | xargs sha256sum > MANIFEST"+
		" && openssl dgst -sha256 -sign k.pem -out MANIFEST.sig MANIFEST"+
		" && tar -cf ../f.tar MANIFEST MANIFEST.sig device.pem $(sed 's/^[0-9a-f]*  //' MANIFEST) && age -r "+recipient+" -o "+forged+" ../f.tar")
	t.Logf("another key: %s", d.refuse("not by this device", "backup", "restore", forged, "--identity", key))
	// The device checks on its own: the same tars sent past cmlctl.
	conn, err := grpc.NewClient("unix://"+d.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for tarFile, want := range map[string]string{"t.tar": "does not match its signed sum", "f.tar": "not by this device"} {
		st, err := cmlv1.NewControlClient(conn).Restore(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		st.Send(&cmlv1.RestoreChunk{Data: mustRead(t, filepath.Join(d.root, tarFile))})
		if _, err := st.CloseAndRecv(); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s sent to the device: %v", tarFile, err)
		}
	}
	if !d.hasAudit("control.Restore", "failure", "not by this device") {
		t.Error("no audit record of the refused restore")
	}
	if l := d.must("list"); strings.Contains(l, "web") || strings.Contains(l, "evil") {
		t.Fatalf("a refused restore changed the device:\n%s", l)
	}
	d.must("user", "add", "op2", "--role", "user", "--uid", "4243")
	if out, code := d.asUser(4243, "backup", "create", "--out", filepath.Join(d.root, "u.cmlbackup")); code == 0 || !strings.Contains(out, "denied") && !strings.Contains(out, "may not") {
		t.Errorf("a user made a backup: exit %d %s", code, out)
	}

	// Two restores and a backup at once: one container, nothing refused.
	outs := make([]string, 3)
	var wg sync.WaitGroup
	for i := range outs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			args := []string{"backup", "restore", file, "--identity", key}
			if i == 2 {
				args = []string{"backup", "create", "--out", filepath.Join(d.root, "again.cmlbackup")}
			}
			o, e, code := d.ctl(args...)
			outs[i] = fmt.Sprintf("exit %d %s%s", code, o, e)
		}()
	}
	wg.Wait()
	out = outs[0] + outs[1]
	t.Logf("restore:\n%s", out)
	if strings.Count(d.must("list"), "web") != 1 || !strings.HasPrefix(outs[2], "exit 0") {
		t.Errorf("after two restores and a backup at once:\n%s\n%s", d.must("list"), outs[2])
	}
	for _, want := range []string{"container web", "account op", "owner CA"} {
		if !strings.Contains(out, want) {
			t.Errorf("restore does not report %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "refused") || !strings.HasPrefix(outs[0], "exit 0") || !strings.HasPrefix(outs[1], "exit 0") {
		t.Errorf("restore refused a part:\n%s", out)
	}
	if !strings.Contains(d.must("ca", "list"), "owner-ca") || !strings.Contains(d.must("user", "list"), "op") {
		t.Error("owner CA or account not restored")
	}
	d.must("start", "web")
	d.waitState("web", "RUNNING", 10e9)
	d.must("stop", "web")
	if !d.hasAudit("backup.restore", "success", "container web") {
		t.Error("no audit record of the restored container")
	}
	// Again: everything is present, nothing changes.
	if out := d.must("backup", "restore", file, "--identity", key); strings.Contains(out, "restored") {
		t.Errorf("a second restore restored again:\n%s", out)
	}
}
