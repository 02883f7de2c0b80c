package rootfs

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// namespaces caches one user namespace per id range: making one costs a
// clone of the daemon (about a millisecond with a large heap) at every
// start, and the namespace holds no process, only the mapping. A
// container's range never changes while it exists, and the ranges are
// bounded by the number of container slots.
var namespaces struct {
	sync.Mutex
	fds map[[2]uint32]int
}

// userns returns a (cached) user namespace fd mapping 0..count-1 to
// base..base+count-1. The caller must not close it.
func userns(base, count uint32) (int, error) {
	key := [2]uint32{base, count}
	namespaces.Lock()
	fd, ok := namespaces.fds[key]
	namespaces.Unlock()
	if ok {
		return fd, nil
	}
	// Made without the lock: other containers' starts do not wait for
	// this clone. Two starts racing for one range keep the first fd.
	fd, err := usernsFD(base, count)
	if err != nil {
		return -1, err
	}
	namespaces.Lock()
	defer namespaces.Unlock()
	if have, ok := namespaces.fds[key]; ok {
		unix.Close(fd)
		return have, nil
	}
	if namespaces.fds == nil {
		namespaces.fds = map[[2]uint32]int{}
	}
	namespaces.fds[key] = fd
	return fd, nil
}

// usernsFD returns an fd of a new user namespace mapping 0..count-1 to
// base..base+count-1, for idmapped mounts.
//
// A short-lived child is cloned into the namespace. It shares cmld's file
// descriptor table (CLONE_FILES) instead of copying it: a copied table
// would keep every pipe end and runtime output of concurrent starts open
// for as long as the child lives, and two starts could then wait on each
// other for ever. The child makes raw system calls only (no Go code runs
// after the clone): it asks to die with its parent and sleeps in pause(2)
// until the parent, holding the namespace fd, kills it.
func usernsFD(base, count uint32) (int, error) {
	// PR_SET_PDEATHSIG fires when the cloning thread exits; keep it.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	pid, _, errno := unix.RawSyscall6(unix.SYS_CLONE, uintptr(unix.CLONE_NEWUSER|unix.CLONE_FILES|unix.SIGCHLD), 0, 0, 0, 0, 0)
	if errno != 0 {
		return -1, fmt.Errorf("clone user namespace: %w", errno)
	}
	if pid == 0 {
		unix.RawSyscall(unix.SYS_PRCTL, unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0)
		for {
			unix.RawSyscall(unix.SYS_PAUSE, 0, 0, 0)
		}
	}
	defer func() {
		unix.Kill(int(pid), unix.SIGKILL)
		var ws unix.WaitStatus
		for {
			if _, err := unix.Wait4(int(pid), &ws, 0, nil); err != unix.EINTR {
				break
			}
		}
	}()
	m := []byte(fmt.Sprintf("0 %d %d\n", base, count))
	proc := "/proc/" + strconv.Itoa(int(pid))
	if err := os.WriteFile(proc+"/uid_map", m, 0); err != nil {
		return -1, fmt.Errorf("uid_map: %w", err)
	}
	if err := os.WriteFile(proc+"/gid_map", m, 0); err != nil {
		return -1, fmt.Errorf("gid_map: %w", err)
	}
	fd, err := unix.Open(proc+"/ns/user", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open user namespace: %w", err)
	}
	return fd, nil
}
