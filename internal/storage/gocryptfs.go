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
	// Mapper is the device-mapper name of the dm backend's volume.
	Mapper string `json:"mapper,omitempty"`
	// FuseConn is the FUSE connection's number (/sys/fs/fuse/connections/N):
	// the last resort to end a gocryptfs that cannot exit.
	FuseConn uint32 `json:"fuse_conn,omitempty"`
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
			closeVolume(v, filepath.Dir(filepath.Dir(run)))
		}
	}()
	if werr != nil {
		return nil, fmt.Errorf("gocryptfs: %w", werr)
	}
	if err := waitFuse(ctx, v.Plain, v.Pid); err != nil {
		return nil, fmt.Errorf("gocryptfs: %w (%s)", err, lastLine(v.Log))
	}
	var st unix.Stat_t
	if unix.Stat(v.Plain, &st) == nil {
		v.FuseConn = unix.Minor(st.Dev)
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
	// Sequential reads cross FUSE in 128 KiB requests; a deeper
	// read-ahead keeps gocryptfs busy decrypting ahead of the reader.
	os.WriteFile("/sys/block/"+filepath.Base(v.Loop)+"/queue/read_ahead_kb", []byte("4096"), 0)
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
// gocryptfs view and waits for gocryptfs to end. A gocryptfs left by a
// daemon that died keeps that daemon's mount namespace alive: whatever
// is mounted under runDir there is detached first. Idempotent.
func closeVolume(v *volume, runDir string) error {
	if v.Backend == backendDM {
		return closeDM(v)
	}
	if self, _ := os.Readlink("/proc/self/ns/mnt"); v.Pid > 0 && isGocryptfs(v.Pid, v.Plain) {
		if ns, _ := os.Readlink("/proc/" + strconv.Itoa(v.Pid) + "/ns/mnt"); ns != "" && ns != self {
			detachAll(v.Pid, runDir)
		}
	}
	if err := unmountVolume(v.Data); err != nil {
		return err
	}
	if v.Loop != "" {
		exec.Command("losetup", "-d", v.Loop).Run()
	}
	if err := unix.Unmount(v.Plain, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		unix.Unmount(v.Plain, unix.MNT_DETACH)
	}
	stopGocryptfs(v.Pid, v.Plain, v.FuseConn)
	return nil
}

// busyWait bounds how long unmountVolume retries a busy volume.
var busyWait = 3 * time.Second

// unmountVolume unmounts a container's decrypted ext4 volume. A mount is
// busy for a moment whenever cmld forks (runc, losetup, gocryptfs for
// another container) while one of its goroutines has a file open in it:
// the child holds a copy of every descriptor until it execs. So EBUSY is
// retried for up to busyWait. A volume still busy after that stays
// mounted, with the layers under it: pulling the loop device or gocryptfs
// from under a mounted ext4 loses its unwritten data and leaves a mount
// that answers EIO. The caller keeps the volume to close it later.
func unmountVolume(dir string) error {
	deadline := time.Now().Add(busyWait)
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		err := unix.Unmount(dir, 0)
		if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("unmount volume: %w", err)
		}
		time.Sleep(delay)
	}
}

// stopGocryptfs ends gocryptfs pid if it still serves plain (the pid may
// have been reused after a restart: its command line must match). A
// gocryptfs that does not end (its exit waits on I/O only it could serve)
// has its FUSE connection aborted: pending requests fail instead of
// hanging forever.
func stopGocryptfs(pid int, plain string, conn uint32) {
	if pid <= 0 || !isGocryptfs(pid, plain) {
		return
	}
	abortLater := time.AfterFunc(2*time.Second, func() { abortFuse(conn) })
	defer abortLater.Stop()
	unix.Kill(pid, unix.SIGTERM)
	if waitGone(pid, plain, 2*time.Second) {
		return
	}
	abortFuse(conn)
	unix.Kill(pid, unix.SIGKILL)
	waitGone(pid, plain, 2*time.Second)
}

func waitGone(pid int, plain string, d time.Duration) bool {
	for t0 := time.Now(); time.Since(t0) < d; time.Sleep(10 * time.Millisecond) {
		if !isGocryptfs(pid, plain) && !exiting(pid) {
			return true
		}
	}
	return false
}

// exiting reports a process with a thread that has not finished exiting
// (a leader already a zombie can have threads stuck in the kernel, with
// the FUSE device still open).
func exiting(pid int) bool {
	tasks, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/stat")
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) && b[i+2] != 'Z' && b[i+2] != 'X' {
			return true
		}
	}
	return false
}

// abortFuse aborts FUSE connection conn through fusectl (mounted in
// cmld's namespace on first use).
func abortFuse(conn uint32) {
	if conn == 0 {
		return
	}
	dir := "/sys/fs/fuse/connections"
	if _, err := os.Stat(filepath.Join(dir, strconv.Itoa(int(conn)))); err != nil {
		unix.Mount("fusectl", dir, "fusectl", 0, "")
	}
	os.WriteFile(filepath.Join(dir, strconv.Itoa(int(conn)), "abort"), []byte("1"), 0)
}

func isGocryptfs(pid int, plain string) bool {
	mp, ok := gocryptfsMount(pid)
	return ok && mp == plain
}

// gocryptfsMount returns the mount point a gocryptfs process serves (its
// last argument), or false for any other process.
func gocryptfsMount(pid int) (string, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return "", false
	}
	args := bytes.Split(bytes.TrimRight(b, "\x00"), []byte{0})
	if len(args) < 2 || filepath.Base(string(args[0])) != "gocryptfs" {
		return "", false
	}
	return string(args[len(args)-1]), true
}

// CleanupUnder ends what encrypted volumes under dir left behind after a
// daemon died: for each gocryptfs serving a mount point under dir whose
// mount namespace is not ours (the dead daemon's, which it keeps alive),
// every mount under runDir (container roots and volumes) in that
// namespace is detached first, so that no
// decrypted volume stays mounted there and gocryptfs's exit does not wait
// on I/O only it could serve; then loop devices backed by files under dir
// are freed and gocryptfs is stopped. keep names mount points whose
// gocryptfs must stay (re-adopted containers).
func CleanupUnder(dir, runDir string, keep map[string]bool) {
	self, _ := os.Readlink("/proc/self/ns/mnt")
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		plain, ok := gocryptfsMount(pid)
		if !ok || !strings.HasPrefix(plain, dir+"/") {
			continue
		}
		if ns, _ := os.Readlink("/proc/" + e.Name() + "/ns/mnt"); ns != "" && ns != self {
			detachAll(pid, runDir)
		}
		if keep[plain] {
			continue
		}
		var conn uint32
		if mi, err := os.ReadFile("/proc/" + e.Name() + "/mountinfo"); err == nil {
			conn = fuseConnIn(mi, plain)
		}
		freeLoops(filepath.Dir(plain))
		stopGocryptfs(pid, plain, conn)
	}
	freeLoops(dir)
}

// detachAll lazily unmounts, in process pid's mount namespace, every
// mount under dir, deepest first.
func detachAll(pid int, dir string) {
	mi, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/mountinfo")
	if err != nil {
		return
	}
	var mps []string
	for _, l := range strings.Split(string(mi), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			mps = append(mps, f[4])
		}
	}
	for i := len(mps) - 1; i >= 0; i-- {
		exec.Command("nsenter", "-t", strconv.Itoa(pid), "-m", "umount", "-l", mps[i]).Run()
	}
}

// fuseConnIn finds the FUSE connection of mount point mp in a mountinfo.
func fuseConnIn(mi []byte, mp string) uint32 {
	for _, l := range strings.Split(string(mi), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && f[4] == mp {
			if _, minor, ok := strings.Cut(f[2], ":"); ok {
				n, _ := strconv.Atoi(minor)
				return uint32(n)
			}
		}
	}
	return 0
}

// freeLoops detaches loop devices backed by files under dir.
func freeLoops(dir string) {
	out, err := exec.Command("losetup", "-n", "-O", "NAME,BACK-FILE", "-l").Output()
	if err != nil {
		return
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && strings.HasPrefix(f[1], dir+"/") {
			exec.Command("losetup", "-d", f[0]).Run()
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
