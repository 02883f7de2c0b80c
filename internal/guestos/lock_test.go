package guestos

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/testutil"
)

// Bug 4: an install copying and hashing its images holds no lock that
// reads wait for. The progress callback runs between copying and hashing;
// with the store lock held there, Get and List would never return.
func TestInstallDoesNotBlockReaders(t *testing.T) {
	p := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	s, _ := openStore(t, p)
	if _, err := s.Install(t.Context(), makeBundle(t, p, "base", 1, 4), nil); err != nil {
		t.Fatal(err)
	}
	src := makeBundle(t, p, "big", 1, 64)
	called := false
	progress := func(phase string, done, total uint64) {
		if called || phase != "verify" {
			return
		}
		called = true
		finished := make(chan struct{})
		go func() {
			s.Get("base", 0)
			s.List()
			s.Highest("base")
			close(finished)
		}()
		select {
		case <-finished:
		case <-time.After(20 * time.Second): // liveness, not timing
			t.Fatal("readers blocked by an install in progress")
		}
	}
	if _, err := s.Install(t.Context(), src, progress); err != nil {
		t.Fatal(err)
	}
	if !called {
		t.Fatal("progress never reported")
	}
	// The identical bundle again (a retry) is success; another bundle of
	// the same name and version is refused.
	if _, err := s.Install(t.Context(), src, nil); err != nil {
		t.Errorf("retry of the identical install: %v", err)
	}
	if _, err := s.Install(t.Context(), makeBundle(t, p, "big", 1, 8), nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("another bundle of an installed version: %v", err)
	}
}

// Every file cmld opens from a bundle must be a regular file, opened
// without blocking: a FIFO, a socket, a device node or a symlink in its
// place is refused with one line, and the store is unchanged.
func TestInstallRefusesNonRegularFiles(t *testing.T) {
	p := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	s, _ := openStore(t, p)
	for _, file := range []string{"root.img", ManifestFile} {
		for _, kind := range []string{"fifo", "socket", "chardev", "symlink"} {
			t.Run(file+"/"+kind, func(t *testing.T) {
				src := makeBundle(t, p, "odd", 1, 2)
				path := filepath.Join(src, file)
				os.Remove(path)
				switch kind {
				case "fifo":
					if err := unix.Mkfifo(path, 0o644); err != nil {
						t.Fatal(err)
					}
				case "socket":
					l, err := net.Listen("unix", path)
					if err != nil {
						t.Fatal(err)
					}
					defer l.Close()
				case "chardev":
					if os.Geteuid() != 0 {
						t.Skip("mknod of a device needs root")
					}
					if err := unix.Mknod(path, unix.S_IFCHR|0o644, int(unix.Mkdev(1, 5))); err != nil { // /dev/zero
						t.Fatal(err)
					}
				case "symlink":
					os.Symlink("/etc/shadow", path)
				}
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
				defer cancel()
				done := make(chan error, 1)
				go func() { _, err := s.Install(ctx, src, nil); done <- err }()
				select {
				case err := <-done:
					if err == nil {
						t.Fatal("installed")
					}
					if msg := err.Error(); len(msg) == 0 || containsNewline(msg) {
						t.Errorf("error is not one line: %q", msg)
					}
				case <-time.After(20 * time.Second):
					t.Fatal("install blocked on a non-regular file")
				}
				if ents := storeEntries(t, s); len(ents) != 0 {
					t.Errorf("store holds %v after a refused install", ents)
				}
			})
		}
	}
}

func containsNewline(s string) bool {
	for _, c := range s {
		if c == '\n' {
			return true
		}
	}
	return false
}
