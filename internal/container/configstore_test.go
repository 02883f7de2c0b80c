package container

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/testutil"
)

// storedFiles lists the container's state directory (names and contents
// of the config files the link names), to compare before and after.
func storedFiles(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	cdir := storedConfigDir(dir)
	ents, _ := os.ReadDir(cdir)
	for _, e := range ents {
		c, _ := os.ReadFile(filepath.Join(cdir, e.Name()))
		fmt.Fprintf(&b, "%s=%q\n", e.Name(), c)
	}
	return b.String()
}

// Item 4: a config update is one unit. A failure injected at every step
// of the write leaves the old config, its signature and its acceptance:
// the container still starts, and a restarted manager sees the old one.
func TestUpdateConfigFailsWhole(t *testing.T) {
	f := newFixture(t)
	f.create("a", "")
	id := f.id("a")
	dir := f.m.containerDir(id)
	// A first successful update, so there is an old version to keep.
	if _, err := f.m.UpdateConfig(t.Context(), "a", ConfigFile{Text: []byte("name: \"a\"\nguest_os: \"busybox\"\nstop_timeout: 5\n")}); err != nil {
		t.Fatal(err)
	}
	before := storedFiles(t, dir)
	steps := []string{"mkdir", "write config.conf", "write accept.json", "link", "switch"}
	for _, step := range steps {
		t.Run(step, func(t *testing.T) {
			configFault = func(s string) error {
				if s == step {
					return errors.New("injected: " + s)
				}
				return nil
			}
			defer func() { configFault = nil }()
			_, err := f.m.UpdateConfig(t.Context(), "a", ConfigFile{Text: []byte("name: \"a\"\nguest_os: \"busybox\"\nstop_timeout: 9\n")})
			if err == nil {
				t.Fatal("update succeeded despite the fault")
			}
			configFault = nil
			if after := storedFiles(t, dir); after != before {
				t.Errorf("stored config changed:\nbefore %s\nafter  %s", before, after)
			}
			cfg, _ := f.m.Config("a")
			if cfg.GetStopTimeout() != 5 {
				t.Errorf("in-memory config changed: stop_timeout %d", cfg.GetStopTimeout())
			}
			if _, err := f.m.Start(t.Context(), "a", StartOptions{}); err != nil {
				t.Fatalf("start after a failed update: %v", err)
			}
			if _, err := f.m.Stop(t.Context(), "a", 0); err != nil {
				t.Fatal(err)
			}
		})
	}
	// A manager started afresh on the same state sees the old config.
	m2, err := New(f.m.o)
	if err != nil {
		t.Fatal(err)
	}
	if err := m2.Recover(t.Context()); err != nil {
		t.Fatal(err)
	}
	if cfg, err := m2.Config("a"); err != nil || cfg.GetStopTimeout() != 5 {
		t.Errorf("after restart: %v %v", cfg, err)
	}
	if _, err := m2.Start(t.Context(), "a", StartOptions{}); err != nil {
		t.Errorf("start after restart: %v", err)
	}
}

// Item 4 on a full disk: the state directory on a small tmpfs, filled up.
func TestUpdateConfigOnFullDisk(t *testing.T) {
	testutil.RequireRoot(t)
	f := newFixture(t)
	f.create("a", "")
	dir := f.m.containerDir(f.id("a"))
	// Move the container's directory onto a tiny tmpfs, and fill it.
	small := t.TempDir()
	if err := syscall.Mount("tmpfs", small, "tmpfs", 0, "size=64k"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(small, syscall.MNT_DETACH) })
	if err := os.CopyFS(filepath.Join(small, "c"), os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}
	// CopyFS resolves the link into a directory; restore it.
	os.RemoveAll(filepath.Join(small, "c", configLink))
	target, _ := os.Readlink(filepath.Join(dir, configLink))
	os.Symlink(target, filepath.Join(small, "c", configLink))
	os.RemoveAll(dir)
	if err := os.Symlink(filepath.Join(small, "c"), dir); err != nil {
		t.Fatal(err)
	}
	fill, _ := os.Create(filepath.Join(small, "fill"))
	fill.Write(make([]byte, 1<<20)) // ENOSPC somewhere in here
	fill.Close()
	before := storedFiles(t, dir)
	big := "name: \"a\"\nguest_os: \"busybox\"\n" + strings.Repeat("init_env: \"K=vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv\"\n", 200)
	if _, err := f.m.UpdateConfig(t.Context(), "a", ConfigFile{Text: []byte(big)}); err == nil {
		t.Fatal("update on a full disk succeeded")
	}
	if after := storedFiles(t, dir); after != before {
		t.Errorf("a failed update on a full disk changed the stored config")
	}
	if _, err := f.m.Start(t.Context(), "a", StartOptions{}); err != nil {
		t.Fatalf("start after a failed update: %v", err)
	}
}

// Containers stored before versioned configs (config.conf and the
// acceptance in meta.json at the top of their directory) load, start, and
// move to the versioned layout at their next update.
func TestLegacyConfigLayout(t *testing.T) {
	f := newFixture(t)
	f.create("old", "")
	id := f.id("old")
	dir := f.m.containerDir(id)
	cur := storedConfigDir(dir)
	text, _ := os.ReadFile(filepath.Join(cur, configFile))
	acc, _ := readAcceptance(dir, meta{})
	os.RemoveAll(cur)
	os.Remove(filepath.Join(dir, configLink))
	os.WriteFile(filepath.Join(dir, configFile), text, 0o600)
	mb := fmt.Sprintf(`{"uuid":%q,"slot":0,"created":"2026-01-01T00:00:00Z","accepted":%q,"trust":%d}`, id, acc.Accepted.Format("2006-01-02T15:04:05.999999999Z07:00"), acc.Trust)
	os.WriteFile(filepath.Join(dir, "meta.json"), []byte(mb), 0o600)

	m2, err := New(f.m.o)
	if err != nil {
		t.Fatal(err)
	}
	if err := m2.Recover(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := m2.Start(t.Context(), "old", StartOptions{}); err != nil {
		t.Fatalf("start of a legacy container: %v", err)
	}
	m2.Stop(t.Context(), "old", 0)
	if _, err := m2.UpdateConfig(t.Context(), "old", ConfigFile{Text: []byte("name: \"old\"\nguest_os: \"busybox\"\nstop_timeout: 3\n")}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, configFile)); err == nil {
		t.Error("legacy config left after the update")
	}
	if storedConfigDir(dir) == dir {
		t.Error("not moved to the versioned layout")
	}
	if _, err := m2.Start(t.Context(), "old", StartOptions{}); err != nil {
		t.Fatalf("start after the update: %v", err)
	}
}

// Item 11: a create retried after a lost connection (the identical config
// and signature) reports the container that exists as success; another
// config under the same name is still refused.
func TestCreateRetryIsSafe(t *testing.T) {
	f := newFixture(t)
	text := []byte("name: \"a\"\nguest_os: \"busybox\"\n")
	first, err := f.m.Create(t.Context(), ConfigFile{Source: "a", Text: text})
	if err != nil {
		t.Fatal(err)
	}
	again, err := f.m.Create(t.Context(), ConfigFile{Source: "a", Text: text})
	if err != nil || again.GetUuid() != first.GetUuid() {
		t.Errorf("retry: %v %v", again, err)
	}
	if _, err := f.m.Create(t.Context(), ConfigFile{Source: "a", Text: []byte("name: \"a\"\nguest_os: \"busybox\"\nstop_timeout: 3\n")}); err == nil {
		t.Error("a different config under an existing name was accepted")
	}
}

// TestCreateRetryWhileTheFirstRuns: while a create is still writing,
// creates of the identical config (a client's retry, two restores of one
// backup) wait for it and succeed with the one container; a different
// config under that name is refused. Before, they were all refused.
func TestCreateRetryWhileTheFirstRuns(t *testing.T) {
	f := newFixture(t)
	text := []byte("name: \"a\"\nguest_os: \"busybox\"\n")
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	configFault = func(step string) error {
		if step == "mkdir" {
			once.Do(func() { close(entered); <-release })
		}
		return nil
	}
	defer func() { configFault = nil }()
	const n = 8
	ids := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	create := func(i int) {
		defer wg.Done()
		c, err := f.m.Create(t.Context(), ConfigFile{Source: "a", Text: text})
		ids[i], errs[i] = c.GetUuid(), err
	}
	wg.Add(1)
	go create(0)
	<-entered // the first holds the name, mid-write
	var other error
	wg.Add(n)
	for i := 1; i < n; i++ {
		go create(i)
	}
	go func() {
		defer wg.Done()
		_, other = f.m.Create(t.Context(), ConfigFile{Source: "a", Text: []byte("name: \"a\"\nguest_os: \"busybox\"\nstop_timeout: 3\n")})
	}()
	time.Sleep(50 * time.Millisecond) // let them reach the name (not asserted)
	close(release)
	wg.Wait()
	for i := range n {
		if errs[i] != nil || ids[i] != ids[0] {
			t.Errorf("create %d: %s %v (first %s)", i, ids[i], errs[i], ids[0])
		}
	}
	if !errors.Is(other, errdefs.ErrAlreadyExists) {
		t.Errorf("a different config under a name being created: %v", other)
	}
	if got := len(f.m.List()); got != 1 {
		t.Errorf("%d containers", got)
	}
}
