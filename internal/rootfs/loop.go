package rootfs

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// attachLoop binds image to a free loop device, read-only and with
// autoclear, so the kernel detaches it when its last mount goes: a crash of
// the daemon after unmount cannot leak it.
func attachLoop(image string) (string, error) {
	f, err := os.OpenFile(image, os.O_RDONLY, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return "", fmt.Errorf("loop devices: %w", err)
	}
	defer ctl.Close()
	for attempt := 0; attempt < 10; attempt++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", fmt.Errorf("find free loop device: %w", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		lf, err := os.OpenFile(dev, os.O_RDONLY, 0)
		if err != nil {
			return "", err
		}
		cfg := unix.LoopConfig{Fd: uint32(f.Fd())}
		cfg.Info.Flags = unix.LO_FLAGS_READ_ONLY | unix.LO_FLAGS_AUTOCLEAR
		err = unix.IoctlLoopConfigure(int(lf.Fd()), &cfg)
		lf.Close()
		if err == nil {
			return dev, nil
		}
		if err != unix.EBUSY {
			return "", fmt.Errorf("configure %s: %w", dev, err)
		}
		// Another process took it between GET_FREE and CONFIGURE.
		time.Sleep(time.Millisecond)
	}
	return "", fmt.Errorf("no free loop device")
}

func detachLoop(dev string) {
	if f, err := os.OpenFile(dev, os.O_RDONLY, 0); err == nil {
		unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
		f.Close()
	}
}
