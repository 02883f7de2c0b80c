package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cmlproject/cml/internal/token"
)

// The device-mapper backend (hosts whose kernel has dm-crypt and
// dm-integrity): a LUKS2 volume with authenticated encryption
// (aes-xts-plain64 with an hmac-sha256 tag per sector in dm-integrity)
// over a sparse file on a loop device, holding ext4. A tampered sector
// reads as EIO.
const backendDM = "luks2-integrity+ext4"

// DMTargets asks the kernel which device-mapper targets it has loaded
// (DM_LIST_VERSIONS on /dev/mapper/control). A leftover control node on
// a kernel without device-mapper fails the ioctl, so it does not count.
func DMTargets() ([]string, error) {
	f, err := os.OpenFile("/dev/mapper/control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("device-mapper: %w", err)
	}
	defer f.Close()
	const hdr = 312 // struct dm_ioctl
	buf := make([]byte, 16384)
	binary.NativeEndian.PutUint32(buf[0:], 4)
	binary.NativeEndian.PutUint32(buf[12:], uint32(len(buf))) // data_size
	binary.NativeEndian.PutUint32(buf[16:], hdr)              // data_start
	const dmListVersions = 0xc138fd0d                         // _IOWR(0xfd, 13, struct dm_ioctl)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), dmListVersions, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
		return nil, fmt.Errorf("device-mapper: %w", errno)
	}
	// struct dm_target_versions { u32 next; u32 version[3]; char name[]; }
	var out []string
	for off := hdr; off+16 < len(buf); {
		next := int(binary.NativeEndian.Uint32(buf[off:]))
		name := buf[off+16:]
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		out = append(out, string(name))
		if next == 0 {
			break
		}
		off += next
	}
	return out, nil
}

// DMCryptAvailable reports whether the device-mapper backend can run:
// the kernel lists crypt and integrity (after loading their modules where
// modprobe exists) and cryptsetup is installed.
func DMCryptAvailable() bool {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		return false
	}
	exec.Command("modprobe", "-q", "dm_crypt").Run()
	exec.Command("modprobe", "-q", "dm_integrity").Run()
	ts, err := DMTargets()
	if err != nil {
		return false
	}
	have := map[string]bool{}
	for _, t := range ts {
		have[t] = true
	}
	return have["crypt"] && have["integrity"]
}

func dmName(id string) string { return "cml-data-" + id }

// openDM opens (on first use: formats) a container's LUKS2 volume and
// mounts its ext4. The passphrase (the derived key, hex) goes to
// cryptsetup on stdin.
func openDM(ctx context.Context, cipher, run, id string, key []byte, sizeMiB uint32) (v *volume, err error) {
	v = &volume{Backend: backendDM, Data: filepath.Join(run, "data"), Mapper: dmName(id)}
	for _, d := range []string{cipher, v.Data} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	img := filepath.Join(cipher, "volume.luks")
	fresh := false
	if _, err := os.Stat(img); errors.Is(err, os.ErrNotExist) {
		f, err := os.OpenFile(img, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return nil, err
		}
		err = f.Truncate(int64(sizeMiB) << 20)
		f.Close()
		if err != nil {
			return nil, err
		}
		fresh = true
	}
	defer func() {
		if err != nil {
			closeDM(v)
			if fresh {
				os.Remove(img)
			}
		}
	}()
	if v.Loop, err = losetup(img); err != nil {
		return nil, err
	}
	pass := make([]byte, hex.EncodedLen(len(key)))
	hex.Encode(pass, key)
	defer token.Zero(pass)
	cs := func(args ...string) error {
		cmd := exec.CommandContext(ctx, "cryptsetup", args...)
		cmd.Stdin = bytes.NewReader(pass)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("cryptsetup %s: %v: %s", args[0], err, firstLine(out))
		}
		return nil
	}
	if fresh {
		t0 := time.Now()
		// --integrity hmac-sha256: every sector carries an authentication
		// tag; the whole device is written once so that every tag exists.
		if err := cs("luksFormat", "--type", "luks2", "--batch-mode", "--cipher", "aes-xts-plain64", "--key-size", "512",
			"--integrity", "hmac-sha256", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", v.Loop); err != nil {
			return nil, err
		}
		v.Formatted = time.Since(t0)
	}
	if err := cs("open", "--key-file=-", v.Loop, v.Mapper); err != nil {
		return nil, err
	}
	dev := "/dev/mapper/" + v.Mapper
	if fresh {
		if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", dev).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("mkfs.ext4: %v: %s", err, firstLine(out))
		}
	}
	if err := unix.Mount(dev, v.Data, "ext4", unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return nil, fmt.Errorf("mount the container's volume: %w", err)
	}
	return v, nil
}

// closeDM unmounts, closes the mapping and frees the loop device.
func closeDM(v *volume) error {
	if err := unmountVolume(v.Data); err != nil {
		return err
	}
	var errs []error
	if v.Mapper != "" {
		if _, err := os.Stat("/dev/mapper/" + v.Mapper); err == nil {
			if out, err := exec.Command("cryptsetup", "close", v.Mapper).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("cryptsetup close: %s", strings.TrimSpace(string(out))))
			}
		}
	}
	if v.Loop != "" {
		exec.Command("losetup", "-d", v.Loop).Run()
	}
	return errors.Join(errs...)
}
