package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// snapshot lists every path under dir, to show that a refusal changed
// nothing on disk.
func snapshot(t *testing.T, dir string) string {
	var paths []string
	filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
		if err == nil && !strings.HasSuffix(p, "audit.log") && !strings.HasSuffix(p, "cmld.lock") {
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
			p := filepath.Join(d.root, "bad.conf")
			os.WriteFile(p, []byte(tc.body), 0o644)
			d.refuse(tc.want, "create", p)
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

func TestBadGuestOS(t *testing.T) {
	d := startDaemon(t)
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
		{"truncated image", func(dir string) { os.Truncate(filepath.Join(dir, "root.img"), 4096) }, "does not match the manifest"},
		{"image path escapes", func(dir string) { editManifest(t, dir, `image_file: "root.img"`, `image_file: "../root.img"`) }, "not a plain file name"},
		{"no root mount", func(dir string) { editManifest(t, dir, `mount_point: "/"`, `mount_point: "/data"`) }, "exactly one image"},
		{"unknown manifest field", func(dir string) { editManifest(t, dir, `init_path:`, "bogus: 1\ninit_path:") }, "unknown field"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyGuestOS(t, d)
			tc.tamper(dir)
			before := snapshot(t, d.stateDir)
			d.refuse(tc.want, "guestos", "install", dir)
			if after := snapshot(t, d.stateDir); after != before {
				t.Errorf("refused install changed the store:\n%s", after)
			}
		})
	}
	d.installGuestOS()
	d.refuse("already installed", "guestos", "install", guestOSDir)
	d.create("user", "")
	d.refuse("used by container(s) user", "guestos", "remove", "busybox", "1")
}

func editManifest(t *testing.T, dir, old, new string) {
	p := filepath.Join(dir, "guestos.conf")
	b, err := os.ReadFile(p)
	if err != nil || !strings.Contains(string(b), old) {
		t.Fatalf("manifest lacks %q", old)
	}
	os.WriteFile(p, []byte(strings.Replace(string(b), old, new, 1)), 0o644)
}
