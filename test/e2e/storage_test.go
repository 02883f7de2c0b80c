package e2e

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/storage"
	"github.com/cmlproject/cml/internal/testutil"
	"github.com/cmlproject/cml/internal/token"
)

const (
	testPIN    = "pin-7c41e9"
	dataMarker = "CML-PLAINTEXT-MARKER-5b2f"
)

func (d *daemon) pinFile(name, pin string) string {
	p := filepath.Join(d.root, name+".pin")
	if err := os.WriteFile(p, []byte(pin+"\n"), 0o600); err != nil {
		d.t.Fatal(err)
	}
	return p
}

func requireGocryptfs(t *testing.T) {
	testutil.RequireTool(t, "gocryptfs", "mkfs.ext4", "losetup", "debugfs", "nsenter")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse: the gocryptfs backend cannot run here")
	}
}

// fileContains reports whether any file under dir contains needle.
func fileContains(dir string, needle []byte) []string {
	var hits []string
	filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || !e.Type().IsRegular() {
			return nil
		}
		if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, needle) {
			hits = append(hits, p)
		}
		return nil
	})
	return hits
}

// TestEncryptedStorageSoftToken: a container's data is encrypted at rest
// under a soft token (TSF-DATA, CR 4.1): it survives stop, start and a
// daemon restart; nothing of it is readable in the state directory; a
// flipped ciphertext byte is an I/O error inside the container, audited;
// wrong PINs lock the token, across a restart, until an administrator
// resets it; the PIN and the key appear on no disk, argv, environment or
// log; a wipe starts the container over.
func TestEncryptedStorageSoftToken(t *testing.T) {
	requireGocryptfs(t)
	d := startDaemon(t)
	d.installGuestOS()
	d.create("vault", "token_type: SOFT\n")
	pin := d.pinFile("vault", testPIN)
	d.must("start", "vault", "--pin-file", pin)
	if st := d.must("state", "vault"); !strings.Contains(st, "AUTHENC/soft/gocryptfs+ext4") {
		t.Errorf("state does not report the encryption: %s", st)
	}
	d.exec("vault", fmt.Sprintf("echo %s > /root/marker; head -c 1048576 /dev/zero | tr '\\0' 'x' > /root/big; sync", dataMarker))
	id := uuidOf(t, d, "vault")

	// Where /root/big lies in the ext4 image: debugfs in cmld's mount
	// namespace, the only one where the volume is mounted.
	cmld := strconv.Itoa(d.cmd.Process.Pid)
	img := filepath.Join(d.run, "storage", id, "plain", "volume.img")
	out, err := exec.Command("nsenter", "-t", cmld, "-m", "debugfs", "-R", "bmap /upper/root/big 10", img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs: %v\n%s", err, out)
	}
	fields := strings.Fields(string(out))
	block, err := strconv.Atoi(fields[len(fields)-1])
	if err != nil || block == 0 {
		t.Fatalf("block of /root/big: %q", out)
	}
	if mps, _ := exec.Command("grep", "-c", id, "/proc/self/mountinfo").Output(); strings.TrimSpace(string(mps)) != "0" {
		t.Errorf("the decrypted volume is mounted in the host's mount namespace")
	}

	// The PIN and the key are nowhere: derive the key as cmld does, from
	// the wrapped file and the PIN, and look for both.
	secret, err := token.Soft{}.Unwrap(context.Background(), filepath.Join(d.stateDir, "containers", id, "token"), id, []byte(testPIN))
	if err != nil {
		t.Fatal(err)
	}
	key, _ := token.Derive(secret, id, "gocryptfs master key", 32)
	needles := map[string][]byte{"PIN": []byte(testPIN), "secret": secret, "key": key, "key (hex)": []byte(hex.EncodeToString(key))}
	for what, n := range needles {
		for _, dir := range []string{d.stateDir, d.run} {
			if hits := fileContains(dir, n); len(hits) > 0 {
				t.Errorf("%s found on disk: %v", what, hits)
			}
		}
		if bytes.Contains(d.log.Bytes(), n) {
			t.Errorf("%s in cmld's log", what)
		}
		procs, _ := filepath.Glob("/proc/[0-9]*")
		for _, p := range procs {
			for _, f := range []string{"cmdline", "environ"} {
				if b, err := os.ReadFile(filepath.Join(p, f)); err == nil && bytes.Contains(b, n) {
					t.Errorf("%s in %s/%s", what, p, f)
				}
			}
		}
	}
	if hits := fileContains(d.stateDir, []byte(dataMarker)); len(hits) > 0 {
		t.Errorf("plaintext of the container's data found in the state directory: %v", hits)
	}

	// Survives stop/start and a daemon restart.
	d.must("stop", "vault")
	d.must("start", "vault", "--pin-file", pin)
	if out, _ := d.exec("vault", "cat /root/marker"); strings.TrimSpace(out) != dataMarker {
		t.Errorf("after stop/start: %q", out)
	}
	d.must("stop", "vault")
	d.restartWithDevice("")
	d.must("start", "vault", "--pin-file", pin)
	if out, _ := d.exec("vault", "cat /root/marker"); strings.TrimSpace(out) != dataMarker {
		t.Errorf("after a daemon restart: %q", out)
	}
	d.must("stop", "vault")

	// One flipped ciphertext byte in a block of /root/big: the read fails
	// inside the container, and cmld reports it.
	ciphers, _ := filepath.Glob(filepath.Join(d.stateDir, "containers", id, "crypt", "*"))
	var volume string
	for _, c := range ciphers {
		if !strings.HasSuffix(c, "gocryptfs.diriv") {
			volume = c
		}
	}
	f, err := os.OpenFile(volume, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	off := int64(18 + block*(4096+32) + 100) // gocryptfs: 18-byte header, 4096+32-byte blocks
	b := make([]byte, 1)
	f.ReadAt(b, off)
	b[0] ^= 0x01
	f.WriteAt(b, off)
	f.Close()
	d.must("start", "vault", "--pin-file", pin)
	if out, code := d.exec("vault", "cat /root/big > /dev/null 2>&1 || echo READ-FAILED"); code != 0 || !strings.Contains(out, "READ-FAILED") {
		t.Errorf("reading a tampered block succeeded: %q %d", out, code)
	}
	if out, _ := d.exec("vault", "cat /root/marker"); strings.TrimSpace(out) != dataMarker {
		t.Errorf("untampered data after the tamper: %q", out)
	}
	waitFor(t, 5*time.Second, func() bool { return d.hasAudit("storage.integrity", "failure", "vault/") }, "audit record of the integrity violation")
	waitFor(t, 5*time.Second, func() bool { return strings.Contains(d.must("state", "vault"), "integrity") }, "state reason naming the integrity violation")
	d.must("stop", "vault")

	// Wrong PINs: counted, the same message every time, locked at three,
	// still locked after a restart (the right PIN too), reset by an
	// administrator.
	wrong := d.pinFile("wrong", "0000")
	var msgs []string
	for i := 0; i < 3; i++ {
		msgs = append(msgs, d.refuse("could not be unlocked", "start", "vault", "--pin-file", wrong))
	}
	d.restartWithDevice("")
	msgs = append(msgs, d.refuse("could not be unlocked", "start", "vault", "--pin-file", pin))
	for _, m := range msgs {
		if m != msgs[0] {
			t.Errorf("refusals differ (CR 1.10): %q vs %q", m, msgs[0])
		}
	}
	if !strings.Contains(d.must("state", "vault"), "LOCKED") {
		t.Errorf("state does not show the locked token")
	}
	if !d.hasAudit("token.unlock", "failure", "wrong PIN (3 of 3 attempts): token locked") || !d.hasAudit("token.unlock", "failure", "token locked after 3 wrong PINs") {
		t.Errorf("the audit trail lacks the lockout details")
	}
	d.must("token", "reset", "vault")
	d.must("start", "vault", "--pin-file", pin)
	d.must("stop", "vault")

	// Wipe: the key file goes (the output says a soft token's old copy
	// still opens), the data with it; the next start begins afresh.
	if out := d.must("wipe", "vault"); !strings.Contains(out, "copy taken earlier") {
		t.Errorf("wipe of a soft token does not say what it cannot promise: %s", out)
	}
	d.must("start", "vault", "--pin-file", pin)
	if out, _ := d.exec("vault", "cat /root/marker 2>&1"); strings.Contains(out, dataMarker) {
		t.Errorf("data survived the wipe: %q", out)
	}
	d.must("stop", "vault")
	d.must("remove", "vault")
	if _, err := os.Stat(filepath.Join(d.stateDir, "containers", id)); err == nil {
		t.Errorf("container directory left after remove")
	}
}

// gocryptfsFor lists the gocryptfs processes serving container id.
func gocryptfsFor(id string) []string {
	var out []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if bytes.Contains(b, []byte("gocryptfs")) && bytes.Contains(b, []byte(id)) {
			out = append(out, p)
		}
	}
	return out
}

func loopsFor(dir string) string {
	out, _ := exec.Command("losetup", "-n", "-O", "NAME,BACK-FILE", "-l").Output()
	var hits []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, dir) {
			hits = append(hits, l)
		}
	}
	return strings.Join(hits, "; ")
}

// TestEncryptedStorageSurvivesCrash: cmld killed during a running
// encrypted container re-adopts it with its volume; killed during an
// encrypted start, the container is cleanly stopped after the restart.
// Either way, after a stop no decrypted volume is mounted anywhere and no
// gocryptfs process or loop device is left.
func TestEncryptedStorageSurvivesCrash(t *testing.T) {
	requireGocryptfs(t)
	d := startDaemon(t)
	d.installGuestOS()
	d.create("vault", "token_type: SOFT\n")
	pin := d.pinFile("vault", testPIN)
	d.must("start", "vault", "--pin-file", pin)
	id := uuidOf(t, d, "vault")
	d.exec("vault", "echo "+dataMarker+" > /root/marker; sync")
	d.crash()
	d.start()
	if st := d.state("vault"); st != "RUNNING" {
		t.Fatalf("after the crash: %s", st)
	}
	if out, _ := d.exec("vault", "cat /root/marker"); strings.TrimSpace(out) != dataMarker {
		t.Errorf("re-adopted container lost its volume: %q", out)
	}
	d.exec("vault", "echo more >> /root/marker; sync")
	d.must("stop", "vault")
	waitFor(t, 5*time.Second, func() bool { return len(gocryptfsFor(id)) == 0 }, "end of the container's gocryptfs")
	if l := loopsFor(filepath.Join(d.run, "storage")); l != "" {
		t.Errorf("loop devices left: %s", l)
	}
	if mps := mountsUnder(t, filepath.Join(d.run, "storage")); len(mps) != 0 {
		t.Errorf("storage mounts left: %v", mps)
	}

	// Killed during an encrypted start (a runtime that never returns).
	wrapper := filepath.Join(d.root, "stuck-runc")
	os.WriteFile(wrapper, []byte("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = run ] && exec sleep 3600; done\nexec runc \"$@\"\n"), 0o755)
	d.cmd.Process.Signal(syscall.SIGTERM)
	d.cmd.Wait()
	d.runtime = wrapper
	d.start()
	client := exec.Command(filepath.Join(binDir, "cmlctl"), "--socket", d.socket, "start", "vault", "--pin-file", pin)
	client.Start()
	defer func() { client.Process.Kill(); client.Wait() }()
	for i := 0; i < 1000 && len(gocryptfsFor(id)) == 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	d.crash()
	exec.Command("pkill", "-f", "sleep 3600").Run()
	d.runtime = ""
	d.start()
	if st := d.state("vault"); st == "RUNNING" || st == "STARTING" {
		t.Errorf("after a crash mid-start: %s", st)
	}
	waitFor(t, 5*time.Second, func() bool { return len(gocryptfsFor(id)) == 0 }, "end of the gocryptfs of the interrupted start")
	if l := loopsFor(filepath.Join(d.run, "storage")); l != "" {
		t.Errorf("loop devices left after a crash mid-start: %s", l)
	}
	d.must("start", "vault", "--pin-file", pin)
	if out, _ := d.exec("vault", "cat /root/marker"); !strings.Contains(out, "more") {
		t.Errorf("data after the interrupted start: %q", out)
	}
	d.must("stop", "vault")
	// No process is stuck in the kernel on a FUSE volume whose server is
	// gone (a gocryptfs ending while mounts on its own volume remained in
	// its namespace would hang there for ever, and every sync with it).
	noStuckIO(t)
}

func noStuckIO(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := exec.CommandContext(ctx, "sync").Run(); err != nil {
		t.Errorf("sync did not complete: %v (a FUSE volume hangs)", err)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) && b[i+2] == 'D' && bytes.Contains(b, []byte("(gocryptfs)")) {
			t.Errorf("gocryptfs stuck in uninterruptible sleep: %s", b[:i+1])
		}
	}
}

// TestWipeDestroysTokenKeys: for PKCS#11 (SoftHSM2) and TPM (cmld's
// swtpm, or the kernel's TPM) tokens, a copy of the token's files taken
// before a wipe, put back afterwards, opens nothing with the right PIN:
// the key was destroyed in the token (CR 4.2, FDP_RIP.2).
func TestWipeDestroysTokenKeys(t *testing.T) {
	requireGocryptfs(t)
	testutil.RequireTool(t, "softhsm2-util")
	module := "/usr/lib/softhsm/libsofthsm2.so"
	if _, err := os.Stat(module); err != nil {
		t.Skip("SoftHSM2 module not installed (apt-get install softhsm2)")
	}
	hsm := t.TempDir()
	os.MkdirAll(filepath.Join(hsm, "tokens"), 0o700)
	conf := filepath.Join(hsm, "softhsm2.conf")
	os.WriteFile(conf, []byte("directories.tokendir = "+filepath.Join(hsm, "tokens")+"\nobjectstore.backend = file\n"), 0o600)
	t.Setenv("SOFTHSM2_CONF", conf)
	if out, err := exec.Command("softhsm2-util", "--init-token", "--free", "--label", "cml", "--pin", testPIN, "--so-pin", "so-9911").CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util: %v\n%s", err, out)
	}
	d := startDaemon(t)
	d.restartWithDevice(fmt.Sprintf("storage {\n  pkcs11_module: %q\n  pkcs11_token_label: \"cml\"\n}\n", module))
	d.installGuestOS()
	pin := d.pinFile("pin", testPIN)
	for _, tt := range []string{"PKCS11", "TPM"} {
		name := strings.ToLower(tt)
		d.create(name, "token_type: "+tt+"\n")
		d.must("start", name, "--pin-file", pin)
		d.exec(name, "echo "+dataMarker+" > /root/marker; sync")
		d.must("stop", name)
		id := uuidOf(t, d, name)
		dir := filepath.Join(d.stateDir, "containers", id)
		saved := filepath.Join(d.root, name+"-saved")
		if out, err := exec.Command("cp", "-a", dir, saved).CombinedOutput(); err != nil {
			t.Fatalf("save: %v %s", err, out)
		}
		// A PKCS#11 token's key is destroyed only with its PIN.
		if tt == "PKCS11" {
			d.refuse("could not be unlocked", "wipe", name, "--pin-file", d.pinFile("wrong", "0000"))
		}
		if out := d.must("wipe", name, "--pin-file", pin); !strings.Contains(out, "destroyed in the token") {
			t.Errorf("%s wipe: %s", tt, out)
		}
		if !d.hasAudit("token.destroy", "success", name+"/") {
			t.Errorf("%s: key destruction not audited", tt)
		}
		// Put the whole saved state back: wrapped key, ciphertext, all.
		for _, sub := range []string{"token", "crypt", "backend"} {
			os.RemoveAll(filepath.Join(dir, sub))
			exec.Command("cp", "-a", filepath.Join(saved, sub), filepath.Join(dir, sub)).Run()
		}
		d.refuse("could not be unlocked", "start", name, "--pin-file", pin)
		if !d.hasAudit("token.unlock", "failure", "not") {
			t.Errorf("%s: the refusal's detail is not audited", tt)
		}
	}
}

// TestEncryptedStartsAtOnceAndDeviceWipe: encrypted containers start and
// stop at the same time, each on its own volume; a device that requires
// encryption refuses a plain config; a device wipe removes everything and
// is audited before it starts.
func TestEncryptedStartsAtOnceAndDeviceWipe(t *testing.T) {
	requireGocryptfs(t)
	d := startDaemon(t)
	d.installGuestOS()
	pin := d.pinFile("pin", testPIN)
	names := []string{"e1", "e2", "e3"}
	for _, n := range names {
		d.create(n, "token_type: SOFT\n")
	}
	d.create("plain", "")
	parallel := func(args func(n string) []string) {
		errs := make(chan string, len(names))
		for _, n := range names {
			go func(n string) {
				_, e, code := d.ctl(args(n)...)
				if code != 0 {
					errs <- n + ": " + e
				} else {
					errs <- ""
				}
			}(n)
		}
		for range names {
			if e := <-errs; e != "" {
				t.Errorf("at once: %s", e)
			}
		}
	}
	parallel(func(n string) []string { return []string{"start", n, "--pin-file", pin} })
	for _, n := range names {
		d.exec(n, "echo "+n+" > /root/who")
	}
	for _, n := range names {
		if out, _ := d.exec(n, "cat /root/who"); strings.TrimSpace(out) != n {
			t.Errorf("%s reads %q from its volume", n, out)
		}
	}
	parallel(func(n string) []string { return []string{"stop", n} })
	for _, n := range names {
		if g := gocryptfsFor(uuidOf(t, d, n)); len(g) != 0 {
			t.Errorf("%s: gocryptfs left after the stop", n)
		}
	}
	d.must("start", "e1", "--pin-file", pin)

	d.restartWithDevice("signed_configs: false\nstorage { require_encryption: true }\n")
	p := filepath.Join(d.root, "plain2.conf")
	os.WriteFile(p, []byte("name: \"plain2\"\nguest_os: \"busybox\"\n"), 0o644)
	d.refuse("token_type", "create", p)

	out := d.must("device", "wipe", "--yes")
	if !strings.Contains(out, "removed 4 containers") || !strings.Contains(out, "copy taken earlier") {
		t.Errorf("device wipe: %s", out)
	}
	if l := d.must("list"); strings.Contains(l, "e1") || strings.Contains(l, "plain") {
		t.Errorf("containers left after the device wipe:\n%s", l)
	}
	if !d.hasAudit("device.wipe", "success", "started") {
		t.Errorf("the device wipe is not audited")
	}
	ents, _ := os.ReadDir(filepath.Join(d.stateDir, "containers"))
	if len(ents) != 0 {
		t.Errorf("container state left after the device wipe: %v", ents)
	}
	noStuckIO(t)
}

// TestEncryptedStorageDeviceMapper: on a kernel with dm-crypt and
// dm-integrity the volume is LUKS2 with an hmac-sha256 tag per sector;
// data survives a stop, and a flipped ciphertext byte in the file's area
// is an I/O error inside the container. Runs in the QEMU lane; skips on
// kernels without device-mapper, saying so.
func TestEncryptedStorageDeviceMapper(t *testing.T) {
	testutil.RequireRoot(t)
	if !storage.DMCryptAvailable() {
		t.Skip("this kernel has no device-mapper with dm-crypt and dm-integrity (or cryptsetup is missing): the gocryptfs backend runs here; the QEMU lane (scripts/vm-test.sh) runs this test on Debian's kernel")
	}
	d := startDaemon(t)
	d.restartWithDevice("storage { volume_size_mib: 64 }\n")
	d.installGuestOS()
	d.create("dmvault", "token_type: SOFT\n")
	pin := d.pinFile("dm", testPIN)
	d.must("start", "dmvault", "--pin-file", pin)
	if st := d.must("state", "dmvault"); !strings.Contains(st, "AUTHENC/soft/luks2-integrity+ext4") {
		t.Errorf("state: %s", st)
	}
	d.exec("dmvault", "echo "+dataMarker+" > /root/marker; dd if=/dev/zero bs=1M count=24 2>/dev/null | tr '\\0' 'y' > /root/big; sync")
	d.must("stop", "dmvault")
	id := uuidOf(t, d, "dmvault")
	img := filepath.Join(d.stateDir, "containers", id, "crypt", "volume.luks")
	if hits := fileContains(filepath.Dir(img), []byte(dataMarker)); len(hits) > 0 {
		t.Errorf("plaintext on disk: %v", hits)
	}
	d.must("start", "dmvault", "--pin-file", pin)
	if out, _ := d.exec("dmvault", "cat /root/marker"); strings.TrimSpace(out) != dataMarker {
		t.Errorf("after stop/start: %q", out)
	}
	d.must("stop", "dmvault")
	// Flip bytes across the data area (after the 16 MiB LUKS2 header):
	// whatever sector of /root/big one hits fails authentication.
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for off := int64(24 << 20); off < 44<<20; off += 1 << 20 {
		b := make([]byte, 1)
		f.ReadAt(b, off+777)
		b[0] ^= 0x40
		f.WriteAt(b, off+777)
	}
	f.Close()
	d.must("start", "dmvault", "--pin-file", pin)
	if out, _ := d.exec("dmvault", "cat /root/big > /dev/null 2>&1 || echo READ-FAILED"); !strings.Contains(out, "READ-FAILED") {
		t.Errorf("reading tampered sectors succeeded")
	}
	d.must("stop", "dmvault")
	if _, err := os.Stat("/dev/mapper/cml-data-" + id); err == nil {
		t.Errorf("the mapping stays after the stop")
	}
}
