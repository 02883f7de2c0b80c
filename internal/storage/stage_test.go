package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audittest"
	"github.com/cmlproject/cml/internal/container"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/rootfs"
	"github.com/cmlproject/cml/internal/testutil"
)

// TestMain runs the package's tests as root in a private mount namespace
// of their own (like cmld's), so that no volume they mount can outlive
// them on the host, whatever happens to the test process.
func TestMain(m *testing.M) {
	if os.Geteuid() == 0 && os.Getenv("CML_STORAGE_TEST_NS") == "" {
		if unshare, err := exec.LookPath("unshare"); err == nil {
			cmd := exec.Command(unshare, append([]string{"-m", "--propagation", "private", os.Args[0]}, os.Args[1:]...)...)
			cmd.Env = append(os.Environ(), "CML_STORAGE_TEST_NS=1")
			cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
			err := cmd.Run()
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				os.Exit(ee.ExitCode())
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			os.Exit(0)
		}
	}
	os.Exit(m.Run())
}

// TestConcurrentEncryptedStarts: four encrypted containers prepared,
// released and prepared again at once (run under -race), with a wrong
// PIN for one of them in the middle: each gets its own volume back with
// its data, the wrong PIN opens nothing and mounts nothing, and at the end
// no volume, gocryptfs process or loop device is left.
func TestConcurrentEncryptedStarts(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "gocryptfs", "mkfs.ext4", "losetup")
	root := t.TempDir()
	runs := filepath.Join(root, "run", "storage")
	rec := &audittest.Recorder{}
	st := New(&cmlv1.StorageSettings{VolumeSizeMib: proto.Uint32(64)}, runs, rec, slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)), nil)
	st.Backend = backendGocryptfs
	cfg := &cmlv1.ContainerConfig{TokenType: cmlv1.ContainerTokenType_SOFT.Enum()}
	const n = 4
	starts := make([]*container.Start, n)
	for i := range starts {
		id := fmt.Sprintf("6f1c2d3e-0000-4000-8000-%012d", i)
		dir := filepath.Join(root, "state", id)
		os.MkdirAll(dir, 0o700)
		starts[i] = &container.Start{ID: id, Name: fmt.Sprintf("c%d", i), Dir: dir, Config: cfg, Secret: []byte(fmt.Sprintf("pin-%d", i))}
	}
	ctx := context.Background()
	round := func(check func(i int, s *container.Start) error) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i, s := range starts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := *s
				if _, err := st.Prepare(ctx, &c); err != nil {
					errs <- fmt.Errorf("%s: prepare: %w", c.Name, err)
					return
				}
				if err := check(i, &c); err != nil {
					errs <- fmt.Errorf("%s: %w", c.Name, err)
				}
				if err := st.Release(ctx, c.ID, nil); err != nil {
					errs <- fmt.Errorf("%s: release: %w", c.Name, err)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	}
	round(func(i int, s *container.Start) error {
		return os.WriteFile(filepath.Join(s.DataDir, "volumes", "mark"), []byte(s.Name), 0o600)
	})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		bad := *starts[0]
		bad.Secret = []byte("wrong")
		if _, err := st.Prepare(ctx, &bad); !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Errorf("a wrong PIN: %v", err)
			st.Release(ctx, bad.ID, nil)
		}
	}()
	round(func(i int, s *container.Start) error {
		b, err := os.ReadFile(filepath.Join(s.DataDir, "volumes", "mark"))
		if err != nil || string(b) != s.Name {
			return fmt.Errorf("data after a second start: %q %v", b, err)
		}
		return nil
	})
	wg.Wait()
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), runs) {
		t.Errorf("volumes left mounted:\n%s", mi)
	}
	if out, _ := exec.Command("losetup", "-a").Output(); strings.Contains(string(out), root) {
		t.Errorf("loop devices left:\n%s", out)
	}
	if out, _ := exec.Command("pgrep", "-af", "gocryptfs.*"+root).Output(); len(out) > 0 {
		t.Errorf("gocryptfs left:\n%s", out)
	}
}

// TestBusyVolumeStaysWhole: a release that finds the decrypted volume
// busy waits a moment for it (cmld's own forks hold it briefly: CI saw
// TestConcurrentEncryptedStarts fail so), and if it stays busy leaves the
// volume mounted and whole instead of pulling gocryptfs from under it;
// the next start closes it first, and refuses while it is still in use.
func TestBusyVolumeStaysWhole(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "gocryptfs", "mkfs.ext4", "losetup")
	root := t.TempDir()
	runs := filepath.Join(root, "run", "storage")
	st := New(&cmlv1.StorageSettings{VolumeSizeMib: proto.Uint32(64)}, runs, &audittest.Recorder{}, slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)), nil)
	st.Backend = backendGocryptfs
	id := "6f1c2d3e-0000-4000-8000-00000000000b"
	dir := filepath.Join(root, "state", id)
	os.MkdirAll(dir, 0o700)
	start := &container.Start{ID: id, Name: "busy", Dir: dir, Config: &cmlv1.ContainerConfig{TokenType: cmlv1.ContainerTokenType_SOFT.Enum()}, Secret: []byte("pin")}
	ctx := context.Background()
	prepare := func() string {
		t.Helper()
		s := *start
		if _, err := st.Prepare(ctx, &s); err != nil {
			t.Fatalf("prepare: %v", err)
		}
		return s.DataDir
	}
	// hold keeps the volume busy for d: a process whose working
	// directory is in it.
	hold := func(dataDir, d string) *exec.Cmd {
		t.Helper()
		cmd := exec.Command("sleep", d)
		cmd.Dir = filepath.Join(dataDir, "volumes")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd
	}
	data := prepare()
	mark := filepath.Join(data, "volumes", "mark")
	if err := os.WriteFile(mark, []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Busy for a moment: the release waits it out.
	h := hold(data, "0.3")
	if err := st.Release(ctx, id, nil); err != nil {
		t.Errorf("a volume busy for 0.3 s: %v", err)
	}
	h.Wait()

	// Busy for longer than the release waits.
	data = prepare()
	h = hold(data, "30")
	defer h.Process.Kill()
	old := busyWait
	busyWait = 200 * time.Millisecond
	defer func() { busyWait = old }()
	if err := st.Release(ctx, id, nil); err == nil || !strings.Contains(err.Error(), "busy") {
		t.Errorf("release of a volume kept busy: %v", err)
	}
	if b, err := os.ReadFile(mark); err != nil || string(b) != "kept" {
		t.Fatalf("the busy volume after a release: %q %v (the layers under it were pulled)", b, err)
	}
	s := *start
	if _, err := st.Prepare(ctx, &s); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "still in use") {
		t.Errorf("a start while the last run's volume is busy: %v", err)
	}
	if b, err := os.ReadFile(mark); err != nil || string(b) != "kept" {
		t.Fatalf("the busy volume after a refused start: %q %v", b, err)
	}
	h.Process.Kill()
	h.Wait()
	busyWait = old
	// Free now: the next start closes the old volume and opens it again.
	data = prepare()
	if b, err := os.ReadFile(filepath.Join(data, "volumes", "mark")); err != nil || string(b) != "kept" {
		t.Errorf("data after the busy run: %q %v", b, err)
	}
	if err := st.Release(ctx, id, nil); err != nil {
		t.Error(err)
	}
	if mps, _ := rootfs.MountsUnder(runs); len(mps) > 0 {
		t.Errorf("left mounted: %v", mps)
	}
	if out, _ := exec.Command("pgrep", "-af", "gocryptfs.*"+root).Output(); len(out) > 0 {
		t.Errorf("gocryptfs left:\n%s", out)
	}
}
