package rootfs

import (
	"fmt"
	"os"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// usernsFD returns an fd of a new user namespace mapping 0..count-1 to
// base..base+count-1, for idmapped mounts. A short-lived child is cloned
// into the namespace; it runs raw system calls only (no Go runtime), waits
// on a pipe until the parent holds the namespace fd, and exits.
func usernsFD(base, count uint32) (int, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return -1, err
	}
	var buf [1]byte
	pid, _, errno := unix.RawSyscall6(unix.SYS_CLONE, uintptr(unix.CLONE_NEWUSER|unix.SIGCHLD), 0, 0, 0, 0, 0)
	if errno != 0 {
		unix.Close(p[0])
		unix.Close(p[1])
		return -1, fmt.Errorf("clone user namespace: %w", errno)
	}
	if pid == 0 {
		// Child: die with the parent; drop the write end so the read
		// below ends when the parent closes its copy; then exit.
		unix.RawSyscall(unix.SYS_PRCTL, unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0)
		unix.RawSyscall(unix.SYS_CLOSE, uintptr(p[1]), 0, 0)
		unix.RawSyscall(unix.SYS_READ, uintptr(p[0]), uintptr(unsafe.Pointer(&buf[0])), 1)
		unix.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
	}
	unix.Close(p[0])
	defer func() {
		unix.Close(p[1])
		var ws unix.WaitStatus
		unix.Wait4(int(pid), &ws, 0, nil)
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
