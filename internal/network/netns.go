package network

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// newNetNS makes a network namespace owned by cmld's (the initial) user
// namespace and returns a descriptor that holds it. A container that joins
// it, even with CAP_NET_ADMIN in its own user namespace, cannot change its
// addresses, routes or rules: the kernel checks that capability against
// the namespace's owner. IPv6 is off in it (container links are IPv4).
func newNetNS() (*os.File, error) {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer orig.Close()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("new network namespace: %w", err)
	}
	ns, err := os.Open("/proc/thread-self/ns/net")
	if err == nil {
		// /proc/sys/net is the opening thread's namespace.
		for _, p := range []string{"/proc/sys/net/ipv6/conf/all/disable_ipv6", "/proc/sys/net/ipv6/conf/default/disable_ipv6"} {
			os.WriteFile(p, []byte("1"), 0)
		}
	}
	if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); serr != nil {
		// The thread is in the wrong namespace: it must not run anything
		// else. Leaving it locked makes the runtime end it with the
		// goroutine.
		if ns != nil {
			ns.Close()
		}
		return nil, fmt.Errorf("return to the host network namespace: %w", serr)
	}
	runtime.UnlockOSThread()
	if err != nil {
		return nil, err
	}
	return ns, nil
}

// openNetNS opens the network namespace process pid is in.
func openNetNS(pid int) (*os.File, error) {
	return os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
}

// sysctl writes a value under /proc/sys/net of cmld's namespace.
func sysctl(path, value string) error {
	return os.WriteFile("/proc/sys/net/"+path, []byte(value), 0)
}
