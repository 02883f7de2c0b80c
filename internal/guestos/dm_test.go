package guestos

import (
	"os"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/cmlproject/cml/internal/testutil"
)

// hasDMInKernel reads the kernel's own list of misc devices.
func hasDMInKernel() bool {
	b, _ := os.ReadFile("/proc/misc")
	return strings.Contains(string(b), "device-mapper")
}

// TestDeviceMapperDetectionAsksTheKernel: a /dev/mapper/control node that
// some tool left on a kernel without device-mapper must not make cmld
// believe in dm-verity (every start would then fail as an integrity
// violation). The node is faked in a private mount namespace.
func TestDeviceMapperDetectionAsksTheKernel(t *testing.T) {
	testutil.RequireRoot(t)
	_, err := DeviceMapperVersion()
	if got, want := err == nil, hasDMInKernel(); got != want {
		t.Fatalf("device-mapper detected %t, kernel has it %t (%v)", got, want, err)
	}
	if hasDMInKernel() {
		t.Log("kernel has device-mapper: the fake-node case needs a kernel without it (the QEMU job covers the other case)")
		return
	}
	done := make(chan error)
	go func() {
		// This goroutine's thread gets its own mount namespace and dies
		// with it (no UnlockOSThread).
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			done <- err
			return
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			done <- err
			return
		}
		os.MkdirAll("/dev/mapper", 0o755)
		if err := unix.Mount("tmpfs", "/dev/mapper", "tmpfs", 0, "mode=0755"); err != nil {
			done <- err
			return
		}
		if err := unix.Mknod("/dev/mapper/control", unix.S_IFCHR|0o600, int(unix.Mkdev(10, 236))); err != nil {
			done <- err
			return
		}
		if v, err := DeviceMapperVersion(); err == nil {
			t.Errorf("a stray control node was taken for device-mapper %s", v)
		}
		if DMVerityAvailable() {
			t.Error("dm-verity reported available on a kernel without device-mapper")
		}
		done <- nil
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
