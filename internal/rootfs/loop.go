package rootfs

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// attachLoop binds image to a free loop device, read-only and with
// autoclear, so the kernel detaches it when its last user goes: a crash of
// the daemon after unmount cannot leak it. It returns the device open: the
// caller closes it only after mounting, since autoclear would otherwise
// tear the device down under the mount (seen on tmpfs: "cannot find valid
// erofs superblock").
func attachLoop(image string) (string, *os.File, error) {
	f, err := os.OpenFile(image, os.O_RDONLY, 0)
	if err != nil {
		return "", nil, err
	}
	defer f.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return "", nil, fmt.Errorf("loop devices: %w", err)
	}
	defer ctl.Close()
	for attempt := 0; attempt < 10; attempt++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", nil, fmt.Errorf("find free loop device: %w", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		lf, err := os.OpenFile(dev, os.O_RDONLY, 0)
		if err != nil {
			return "", nil, err
		}
		cfg := unix.LoopConfig{Fd: uint32(f.Fd())}
		cfg.Info.Flags = unix.LO_FLAGS_READ_ONLY | unix.LO_FLAGS_AUTOCLEAR
		err = unix.IoctlLoopConfigure(int(lf.Fd()), &cfg)
		if err == nil {
			return dev, lf, nil
		}
		lf.Close()
		if err != unix.EBUSY {
			return "", nil, fmt.Errorf("configure %s: %w", dev, err)
		}
		// Another process took it between GET_FREE and CONFIGURE.
		time.Sleep(time.Millisecond)
	}
	return "", nil, fmt.Errorf("no free loop device")
}

func detachLoop(dev string) {
	if f, err := os.OpenFile(dev, os.O_RDONLY, 0); err == nil {
		unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
		f.Close()
	}
}
