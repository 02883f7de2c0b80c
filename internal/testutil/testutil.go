// Package testutil holds helpers shared by CML's tests: the one place that
// decides whether a root-only test runs, and builders for small real guest
// OS images. It is imported only from tests.
package testutil

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// RequireRoot skips t unless it runs as root; CI runs as root, so these
// tests run there.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts, namespaces, cgroups); CI runs as root")
	}
}

// RequireTool skips t when a binary the test drives is missing; scripts/
// install-deps.sh installs all of them.
func RequireTool(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Skipf("%s not installed (run scripts/install-deps.sh)", n)
		}
	}
}

// BusyboxRoot writes a minimal busybox root filesystem into dir.
func BusyboxRoot(t testing.TB, dir string) {
	t.Helper()
	RequireTool(t, "busybox")
	for _, d := range []string{"bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(dir, "tmp"), 0o1777)
	bb, _ := exec.LookPath("busybox")
	if out, err := exec.Command("cp", bb, filepath.Join(dir, "bin", "busybox")).CombinedOutput(); err != nil {
		t.Fatalf("copy busybox: %v: %s", err, out)
	}
	for _, applet := range []string{"sh", "cat", "ls", "echo", "sleep", "mount", "mknod", "unshare", "awk", "grep", "touch", "id", "head", "dd", "true", "false", "rm", "mkdir", "stat", "ps", "wc", "date", "hostname", "env"} {
		os.Symlink("busybox", filepath.Join(dir, "bin", applet))
	}
	os.WriteFile(filepath.Join(dir, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "etc", "group"), []byte("root:x:0:\n"), 0o644)
}

// MakeErofs builds an erofs image of dir at img and returns its size and
// SHA-256.
func MakeErofs(t testing.TB, dir, img string) (int64, string) {
	t.Helper()
	RequireTool(t, "mkfs.erofs")
	if out, err := exec.Command("mkfs.erofs", "--quiet", "--all-root", "-T0", img, dir).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.erofs: %v: %s", err, out)
	}
	return FileDigest(t, img)
}

// FileDigest returns the size and hex SHA-256 of a file.
func FileDigest(t testing.TB, path string) (int64, string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		t.Fatal(err)
	}
	return n, hex.EncodeToString(h.Sum(nil))
}
