package safefile

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Every kind of non-regular file in place of a file is refused at once,
// with one line, and a regular file is read.
func TestRefusesNonRegularWithoutBlocking(t *testing.T) {
	dir := t.TempDir()
	regular := filepath.Join(dir, "regular")
	os.WriteFile(regular, []byte("ok"), 0o644)
	fifo := filepath.Join(dir, "fifo")
	unix.Mkfifo(fifo, 0o644)
	sock := filepath.Join(dir, "sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	link := filepath.Join(dir, "link")
	os.Symlink(regular, link)
	cases := map[string]string{"fifo": fifo, "socket": sock, "symlink": link, "directory": dir}
	if os.Geteuid() == 0 {
		dev := filepath.Join(dir, "dev")
		if err := unix.Mknod(dev, unix.S_IFCHR|0o644, int(unix.Mkdev(1, 5))); err == nil {
			cases["character device"] = dev
		}
	}
	for kind, p := range cases {
		done := make(chan error, 1)
		go func() { _, err := ReadFile(p, 1024); done <- err }()
		select {
		case err := <-done:
			if err == nil || strings.Contains(err.Error(), "\n") {
				t.Errorf("%s: %v", kind, err)
			}
		case <-time.After(10 * time.Second): // liveness only
			t.Fatalf("%s: the open blocked", kind)
		}
	}
	if b, err := ReadFile(regular, 1024); err != nil || string(b) != "ok" {
		t.Errorf("regular file: %q %v", b, err)
	}
	if _, err := ReadFile(regular, 1); err == nil {
		t.Error("size bound not applied")
	}
}
