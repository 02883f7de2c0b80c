// Package rootfs assembles a container's root filesystem: the guest OS image
// mounted read-only, idmapped to the container's subordinate id range when
// the container has a user namespace, under an overlay whose writable upper
// layer is the container's data directory.
//
// Every mount lives under one directory per container, so Unmount (and the
// daemon's crash recovery) can find and release all of them from
// /proc/self/mountinfo alone. Images are mounted straight from the file
// (erofs) or through a read-only loop device with autoclear, which the
// kernel releases with the last mount. This package does not verify images
// (the trust chain does, before calling Mount) nor encrypt the upper layer.
package rootfs

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Request describes one root filesystem.
type Request struct {
	Image  string // path of the read-only image file
	FSType string // "erofs" or "squashfs"
	// UIDBase and IDCount describe the container's user namespace mapping
	// (container 0 = host UIDBase); IDCount 0 means no user namespace.
	UIDBase uint32
	IDCount uint32
	// DataDir holds the writable layer (upper/ and work/); empty with
	// ReadOnly.
	DataDir  string
	ReadOnly bool
}

// Mount assembles the root filesystem under dir and returns its path.
// On error everything it mounted is released again.
func Mount(dir string, r Request) (rootfs string, err error) {
	for _, d := range []string{"image", "lower", "rootfs"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return "", err
		}
	}
	if err := Private(dir, r.UIDBase, r.IDCount); err != nil {
		return "", err
	}
	defer func() {
		if err != nil {
			Unmount(dir)
		}
	}()
	image := filepath.Join(dir, "image")
	if err := mountImage(r.Image, r.FSType, image); err != nil {
		return "", err
	}
	lower := image
	if r.IDCount > 0 {
		lower = filepath.Join(dir, "lower")
		if err := idmapClone(image, lower, r.UIDBase, r.IDCount); err != nil {
			return "", fmt.Errorf("idmap image: %w", err)
		}
		// The idmapped clone keeps the filesystem alive; the plain mount
		// is no longer needed and would only be one more thing to leak.
		if err := unix.Unmount(image, unix.MNT_DETACH); err != nil {
			return "", fmt.Errorf("unmount %s: %w", image, err)
		}
	}
	if r.ReadOnly {
		return lower, nil
	}
	upper := filepath.Join(r.DataDir, "upper")
	work := filepath.Join(r.DataDir, "work")
	for _, d := range []string{upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	// The container's root owns the top of its writable layer.
	if r.IDCount > 0 {
		if err := os.Chown(upper, int(r.UIDBase), int(r.UIDBase)); err != nil {
			return "", err
		}
	}
	rootfs = filepath.Join(dir, "rootfs")
	opts := "lowerdir=" + lower + ",upperdir=" + upper + ",workdir=" + work
	// nosuid: no privilege elevation through setuid files (CLIP OS);
	// nodev: device nodes work only where the daemon puts them (/dev).
	if err := unix.Mount("overlay", rootfs, "overlay", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		return "", fmt.Errorf("mount overlay: %w", err)
	}
	return rootfs, nil
}

// Private makes dir reachable by root and the container's own root only:
// owned by the container's mapped root (the id range's first id) with mode
// 0700 when the container has a user namespace, so its processes can
// traverse to their root filesystem and no other local user can reach its
// files, console or data (TSF-ISO); root's and 0700 otherwise.
func Private(dir string, uidBase, idCount uint32) error {
	uid := 0
	if idCount > 0 {
		uid = int(uidBase)
	}
	// cmld runs as root; unit tests of callers may not, and then own
	// the directory themselves.
	if os.Geteuid() == 0 {
		if err := os.Chown(dir, uid, uid); err != nil {
			return err
		}
	}
	return os.Chmod(dir, 0o700)
}

func mountImage(image, fstype, target string) error {
	flags := uintptr(unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV)
	if fstype == "erofs" {
		// erofs mounts straight from a file (Linux 6.12+): no loop device.
		err := unix.Mount(image, target, "erofs", flags, "")
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.ENOTBLK) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("mount %s image: %w", fstype, err)
		}
	}
	dev, lf, err := attachLoop(image)
	if err != nil {
		return err
	}
	defer lf.Close()
	if err := unix.Mount(dev, target, fstype, flags, ""); err != nil {
		detachLoop(dev)
		return fmt.Errorf("mount %s image from %s: %w", fstype, dev, err)
	}
	return nil
}

// idmapClone makes an idmapped copy of the mount at src at dst, shifting
// file owners by base (TSF-ISO: each container sees its image owned by its
// own root, and no two containers share an id).
func idmapClone(src, dst string, base, count uint32) error {
	nsfd, err := userns(base, count)
	if err != nil {
		return err
	}
	tree, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return fmt.Errorf("open_tree: %w", err)
	}
	defer unix.Close(tree)
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_IDMAP | unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV, Userns_fd: uint64(nsfd)}
	if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		return fmt.Errorf("mount_setattr: %w", err)
	}
	if err := unix.MoveMount(tree, "", unix.AT_FDCWD, dst, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount: %w", err)
	}
	return nil
}

// Unmount releases every mount under dir, deepest first. It is also the
// crash-recovery sweep: it needs nothing but dir.
func Unmount(dir string) error {
	mps, err := MountsUnder(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, mp := range mps {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// MountsUnder lists mount points at or below dir, deepest first.
func MountsUnder(dir string) ([]string, error) { return MountsUnderIn("self", dir) }

// MountsUnderIn lists mount points below dir in the mount namespace of
// process pid ("self" for this one).
func MountsUnderIn(pid, dir string) ([]string, error) {
	dir = filepath.Clean(dir)
	f, err := os.Open("/proc/" + pid + "/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescape(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, sc.Err()
}

// unescape decodes mountinfo's octal escapes (\040 for space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
