package storage

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cmlproject/cml/internal/token"
)

// The gocryptfs backend (hosts without device-mapper, with FUSE and loop):
// gocryptfs (AES-256-GCM per 4 KiB block) holds one sparse ext4 image per
// container, attached through a loop device; the container's writable
// layer and volumes live inside the ext4, so names, sizes and metadata
// are covered too. A tampered block reads as EIO.
const (
	backendGocryptfs = "gocryptfs+ext4"
	fuseMagic        = 0x65735546
	volumeFile       = "volume.img"
)

// volume is one open encrypted volume.
type volume struct {
	Backend string `json:"backend"`
	Pid     int    `json:"pid"`            // gocryptfs
	Loop    string `json:"loop,omitempty"` // loop device under the ext4
	Plain   string `json:"plain"`          // gocryptfs mount point
	Data    string `json:"data"`           // ext4 mount point
	Log     string `json:"log"`            // gocryptfs's output
	// Formatted is set when this start made the filesystem (the first).
	Formatted time.Duration `json:"formatted_ns,omitempty"`
}

// openGocryptfs mounts a container's encrypted volume: cipher is its
// ciphertext directory (persistent), run its per-run directory. key is
// the gocryptfs master key (zeroed by the caller). On error nothing stays.
func openGocryptfs(ctx context.Context, cipher, run string, key []byte, sizeMiB uint32) (v *volume, err error) {
	v = &volume{Backend: backendGocryptfs, Plain: filepath.Join(run, "plain"), Data: filepath.Join(run, "data"), Log: filepath.Join(run, "gocryptfs.log")}
	for _, d := range []string{cipher, v.Plain, v.Data} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	// A new volume: gocryptfs's per-directory IV (what gocryptfs -init
	// writes; the key comes from the token, not from a config file).
	diriv := filepath.Join(cipher, "gocryptfs.diriv")
	if _, err := os.Stat(diriv); errors.Is(err, os.ErrNotExist) {
		iv := make([]byte, 16)
		if _, err := randRead(iv); err != nil {
			return nil, err
		}
		if err := os.WriteFile(diriv, iv, 0o400); err != nil {
			return nil, err
		}
	}
	logf, err := os.OpenFile(v.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	// The key goes in on stdin, hex, never in argv or a file.
	cmd := exec.Command("gocryptfs", "-masterkey=stdin", "-fg", "-nosyslog", "-q", "-noprealloc", cipher, v.Plain)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("gocryptfs: %w", err)
	}
	v.Pid = cmd.Process.Pid
	go cmd.Wait() // its status is its log's business; never a zombie
	hexKey := make([]byte, hex.EncodedLen(len(key))+1)
	hex.Encode(hexKey, key)
	hexKey[len(hexKey)-1] = '\n'
	_, werr := stdin.Write(hexKey)
	token.Zero(hexKey)
	stdin.Close()
	defer func() {
		if err != nil {
			closeVolume(v)
		}
	}()
	if werr != nil {
		return nil, fmt.Errorf("gocryptfs: %w", werr)
	}
	if err := waitFuse(ctx, v.Plain, v.Pid); err != nil {
		return nil, fmt.Errorf("gocryptfs: %w (%s)", err, lastLine(v.Log))
	}
	img := filepath.Join(v.Plain, volumeFile)
	if _, err := os.Stat(img); errors.Is(err, os.ErrNotExist) {
		t0 := time.Now()
		if err := format(img, sizeMiB); err != nil {
			os.Remove(img)
			return nil, err
		}
		v.Formatted = time.Since(t0)
	}
	if v.Loop, err = losetup(img); err != nil {
		return nil, err
	}
	if err := unix.Mount(v.Loop, v.Data, "ext4", unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return nil, fmt.Errorf("mount the container's volume: %w", err)
	}
	return v, nil
}

var randRead = func(b []byte) (int, error) { return cryptoRand(b) }

// format makes a sparse ext4 image of sizeMiB.
func format(img string, sizeMiB uint32) error {
	f, err := os.OpenFile(img, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(sizeMiB) << 20)
	f.Close()
	if err != nil {
		return err
	}
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", img).CombinedOutput()
	if err != nil {
		return fmt.Errorf("mkfs.ext4: %v: %s", err, firstLine(out))
	}
	return nil
}

// losetup attaches img to a loop device, with direct I/O where the file
// allows it, autoclear so that the device frees itself when unmounted.
func losetup(img string) (string, error) {
	out, err := exec.Command("losetup", "--find", "--show", "--direct-io=on", img).Output()
	if err != nil {
		out, err = exec.Command("losetup", "--find", "--show", img).Output()
	}
	if err != nil {
		return "", fmt.Errorf("losetup: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// waitFuse waits until gocryptfs has mounted dir, or exited.
func waitFuse(ctx context.Context, dir string, pid int) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var st unix.Statfs_t
		if unix.Statfs(dir, &st) == nil && st.Type == fuseMagic {
			return nil
		}
		if unix.Kill(pid, 0) != nil {
			return fmt.Errorf("exited before mounting")
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("did not mount within 10 s")
}

// closeVolume unmounts the ext4, frees the loop device, unmounts the
// gocryptfs view and waits for gocryptfs to end. Idempotent.
func closeVolume(v *volume) error {
	var errs []error
	if err := unix.Unmount(v.Data, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount volume: %w", err))
	}
	if v.Loop != "" {
		exec.Command("losetup", "-d", v.Loop).Run()
	}
	if err := unix.Unmount(v.Plain, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		unix.Unmount(v.Plain, unix.MNT_DETACH)
	}
	stopGocryptfs(v.Pid, v.Plain)
	return errors.Join(errs...)
}

// stopGocryptfs ends gocryptfs pid if it still serves plain (the pid may
// have been reused after a restart: its command line must match).
func stopGocryptfs(pid int, plain string) {
	if pid <= 0 || !isGocryptfs(pid, plain) {
		return
	}
	unix.Kill(pid, unix.SIGTERM)
	for i := 0; i < 200 && isGocryptfs(pid, plain); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if isGocryptfs(pid, plain) {
		unix.Kill(pid, unix.SIGKILL)
	}
}

func isGocryptfs(pid int, plain string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := bytes.Split(bytes.TrimRight(b, "\x00"), []byte{0})
	return len(args) > 0 && filepath.Base(string(args[0])) == "gocryptfs" && string(args[len(args)-1]) == plain
}

// sweepGocryptfs ends every gocryptfs serving a mount point under runs and
// frees loop devices backed by files there (after a daemon crash).
func sweepGocryptfs(under string) {
	if out, err := exec.Command("losetup", "-n", "-O", "NAME,BACK-FILE", "-l").Output(); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(out))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) == 2 && strings.HasPrefix(f[1], under+"/") {
				exec.Command("losetup", "-d", f[0]).Run()
			}
		}
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := bytes.Split(bytes.TrimRight(b, "\x00"), []byte{0})
		if len(args) > 1 && filepath.Base(string(args[0])) == "gocryptfs" && strings.HasPrefix(string(args[len(args)-1]), under+"/") {
			stopGocryptfs(pid, string(args[len(args)-1]))
		}
	}
}

func lastLine(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return lines[len(lines)-1]
}

func firstLine(b []byte) string {
	l, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return l
}
