package rootfs

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/cmlproject/cml/internal/testutil"
)

func TestMountIdmappedOverlay(t *testing.T) {
	testutil.RequireRoot(t)
	tmp := t.TempDir()
	testutil.BusyboxRoot(t, filepath.Join(tmp, "src"))
	img := filepath.Join(tmp, "root.img")
	testutil.MakeErofs(t, filepath.Join(tmp, "src"), img)
	dir := filepath.Join(tmp, "run")
	t.Cleanup(func() { Unmount(dir) })

	rootfs, err := Mount(dir, Request{Image: img, FSType: "erofs", UIDBase: 200000, IDCount: 65536, DataDir: filepath.Join(tmp, "data")})
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(rootfs, "bin", "busybox"))
	if err != nil {
		t.Fatal(err)
	}
	if uid := st.Sys().(*syscall.Stat_t).Uid; uid != 200000 {
		t.Errorf("image file owner through idmapped mount = %d, want 200000", uid)
	}
	// Writes land in the upper layer, never in the image.
	if err := os.WriteFile(filepath.Join(rootfs, "etc", "new"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(tmp, "data", "upper", "etc", "new")); err != nil {
		t.Errorf("write did not land in the upper layer: %v", err)
	}
	if err := Unmount(dir); err != nil {
		t.Fatal(err)
	}
	if mps, _ := MountsUnder(dir); len(mps) != 0 {
		t.Errorf("mounts left after Unmount: %v", mps)
	}
}

func TestUnescape(t *testing.T) {
	if got := unescape(`/a\040b`); got != "/a b" {
		t.Errorf("unescape = %q", got)
	}
}

// A state directory on tmpfs works: the loop device stays open until the
// image is mounted (with autoclear, closing it first let the kernel tear
// it down under the mount: "cannot find valid erofs superblock"). Run
// several times, since it was a race.
func TestMountFromTmpfs(t *testing.T) {
	testutil.RequireRoot(t)
	tmp := t.TempDir()
	testutil.BusyboxRoot(t, filepath.Join(tmp, "src"))
	state := filepath.Join(tmp, "state")
	os.MkdirAll(state, 0o700)
	if err := syscall.Mount("tmpfs", state, "tmpfs", 0, "size=64m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(state, syscall.MNT_DETACH) })
	img := filepath.Join(state, "root.img")
	testutil.MakeErofs(t, filepath.Join(tmp, "src"), img)
	for i := 0; i < 5; i++ {
		dir := filepath.Join(tmp, "run")
		rootfs, err := Mount(dir, Request{Image: img, FSType: "erofs", UIDBase: 200000, IDCount: 65536, DataDir: filepath.Join(state, "data")})
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		if _, err := os.Stat(filepath.Join(rootfs, "bin", "busybox")); err != nil {
			t.Error(err)
		}
		if err := Unmount(dir); err != nil {
			t.Fatal(err)
		}
	}
}
