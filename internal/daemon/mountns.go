package daemon

import (
	"fmt"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// mountNSEnv marks the cmld that already runs in its own mount namespace.
const mountNSEnv = "CMLD_OWN_MOUNT_NAMESPACE"

// OwnMountNamespace moves cmld into a mount namespace of its own, before
// anything else runs: it unshares on one thread and re-executes itself
// from that thread (same pid, same arguments). Host mounts still reach
// cmld (the root is a slave); cmld's mounts (container roots, decrypted
// volumes) never reach the host, and no namespace a host process creates
// later can hold a copy of them, so a stopped container's decrypted data
// is mounted nowhere. When cmld dies, its namespace and its copies of the
// mounts go with it; running containers keep theirs.
func OwnMountNamespace() error {
	if os.Getenv(mountNSEnv) == "1" {
		os.Unsetenv(mountNSEnv)
		return nil
	}
	if os.Geteuid() != 0 {
		return nil // cmld refuses to run later, with a reason
	}
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("own mount namespace: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("own mount namespace: make / a slave: %w", err)
	}
	return syscall.Exec("/proc/self/exe", os.Args, append(os.Environ(), mountNSEnv+"=1"))
}
