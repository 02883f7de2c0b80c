package container

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audittest"
	"github.com/cmlproject/cml/internal/containertest"
	"github.com/cmlproject/cml/internal/guestos"
	"github.com/cmlproject/cml/internal/testutil"
	"github.com/cmlproject/cml/internal/tpm"
	"github.com/cmlproject/cml/internal/trust"
	"github.com/cmlproject/cml/internal/verity"
)

// fakeTPM records measurements.
type fakeTPM struct {
	mu     sync.Mutex
	events []tpm.Event
}

func (f *fakeTPM) Measure(ctx context.Context, e tpm.Event) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.events = append(f.events, e)
	return nil
}

func (f *fakeTPM) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.events)
}

// probe is a stage that records its calls and can block or fail.
type probe struct {
	name     string
	mu       sync.Mutex
	prepared map[string]int
	released map[string]int
	removed  map[string]int
	gate     chan struct{} // when non-nil, Prepare (and Remove) wait on it
	entered  chan string   // told when Prepare or Remove starts waiting
	fail     error
}

func newProbe(name string) *probe {
	return &probe{name: name, prepared: map[string]int{}, released: map[string]int{}, removed: map[string]int{}}
}

func (p *probe) Name() string { return p.name }

func (p *probe) wait(ctx context.Context, id string) error {
	p.mu.Lock()
	gate, entered := p.gate, p.entered
	p.mu.Unlock()
	if gate == nil {
		return nil
	}
	if entered != nil {
		entered <- id
	}
	select {
	case <-gate:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (p *probe) Prepare(ctx context.Context, s *Start) (any, error) {
	if err := p.wait(ctx, s.ID); err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fail != nil {
		return nil, p.fail
	}
	p.prepared[s.ID]++
	if s.Rootfs == "" {
		s.Rootfs = filepath.Join(s.RunDir, "rootfs")
	}
	return map[string]string{"by": p.name}, nil
}

func (p *probe) Release(_ context.Context, id string, rec json.RawMessage) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.released[id]++
	return nil
}

func (p *probe) Remove(ctx context.Context, r Removal) error {
	id := r.ID
	if err := p.wait(ctx, id); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.removed[id]++
	return nil
}

func (p *probe) block() (release func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	gate := make(chan struct{})
	p.gate, p.entered = gate, make(chan string, 64)
	var once sync.Once
	return func() {
		once.Do(func() {
			p.mu.Lock()
			p.gate = nil
			p.mu.Unlock()
			close(gate)
		})
	}
}

type fixture struct {
	t      *testing.T
	m      *Manager
	rt     *containertest.Runtime
	audit  *audittest.Recorder
	tpm    *fakeTPM
	probe  *probe // between devices and measure, where rootfs would be
	events <-chan *cmlv1.Event
}

// newFixture makes a manager on the fake runtime with the real verify and
// device stages, a probe stage in place of the root filesystem, and a
// measure stage on a recording TPM. One signed guest OS "busybox" 1 is
// installed (its image is random bytes: nothing mounts it here).
func newFixture(t *testing.T) *fixture {
	t.Helper()
	state := t.TempDir()
	p := testutil.NewPKI(t, "ecdsa-p256", "vendor")
	p.Provision(t, state)
	ts, err := trust.Open(filepath.Join(state, "trust"))
	if err != nil {
		t.Fatal(err)
	}
	store, err := guestos.Open(filepath.Join(state, "guestos"), guestos.Options{Trust: ts})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.Install(t.Context(), guestOSBundle(t, p), nil); err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, rt: containertest.New(), audit: &audittest.Recorder{}, tpm: &fakeTPM{}, probe: newProbe("probe")}
	configs := Acceptor{Trust: ts}
	f.m, err = New(Options{
		StateDir: filepath.Join(state, "containers"),
		RunDir:   filepath.Join(state, "run"),
		Runtime:  f.rt,
		Exits:    f.rt,
		GuestOS:  store,
		Audit:    f.audit,
		Configs:  configs,
		Stages: []Stage{
			&VerifyStage{GuestOS: store, Configs: configs},
			NewDeviceStage(),
			f.probe,
			&MeasureStage{TPM: f.tpm},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.m.Recover(t.Context()); err != nil {
		t.Fatal(err)
	}
	ch, stop := f.m.Subscribe()
	f.events = ch
	t.Cleanup(func() {
		stop()
		for _, id := range f.rt.Running() {
			f.rt.Exit(id, exitCode(0))
		}
		f.m.Wait()
	})
	return f
}

func guestOSBundle(t *testing.T, p *testutil.PKI) string {
	dir := t.TempDir()
	img := make([]byte, 8*verity.BlockSize)
	rand.Read(img)
	os.WriteFile(filepath.Join(dir, "root.img"), img, 0o644)
	sum := sha256.Sum256(img)
	salt := bytes.Repeat([]byte{7}, 32)
	tree, err := verity.Build(bytes.NewReader(img), int64(len(img)), salt, 0)
	if err != nil {
		t.Fatal(err)
	}
	m := fmt.Sprintf("name: \"busybox\"\nversion: 1\ninit_path: \"/bin/sh\"\nmounts { image_file: \"root.img\" mount_point: \"/\" fs_type: \"erofs\" image_size: %d image_sha2_256: %q verity_root_hash: %q verity_salt: %q }\n",
		len(img), hex.EncodeToString(sum[:]), hex.EncodeToString(tree.Root), hex.EncodeToString(salt))
	os.WriteFile(filepath.Join(dir, guestos.ManifestFile), []byte(m), 0o644)
	p.SignFile(t, filepath.Join(dir, guestos.ManifestFile))
	return dir
}

func (f *fixture) create(name string, extra string) *cmlv1.Container {
	f.t.Helper()
	c, err := f.m.Create(f.t.Context(), ConfigFile{Source: name + ".conf", Text: []byte(fmt.Sprintf("name: %q\nguest_os: \"busybox\"\n%s", name, extra))})
	if err != nil {
		f.t.Fatal(err)
	}
	return c
}

func (f *fixture) state(ref string) State {
	f.t.Helper()
	c, err := f.m.State(ref)
	if err != nil {
		f.t.Fatal(err)
	}
	return c.GetState()
}

// waitState waits until ref is in state s; the limit only keeps a broken
// build from hanging (it is not a timing assertion).
func (f *fixture) waitState(ref string, s State) {
	f.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		c, err := f.m.State(ref)
		if err == nil && c.GetState() == s {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	c, _ := f.m.State(ref)
	f.t.Fatalf("container %s never reached %s (is %s: %s)", ref, s, c.GetState(), c.GetReason())
}

func (f *fixture) id(ref string) string {
	c, err := f.m.State(ref)
	if err != nil {
		f.t.Fatal(err)
	}
	return c.GetUuid()
}

func exitCode(code int) exitT { return exitT{Code: code, Known: true} }

// within runs fn and fails the test if it has not returned after a limit
// far beyond anything it should take: a liveness check (a lock held
// across a blocked call would hang it for ever), not a timing assertion.
func within(t *testing.T, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { fn(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("%s blocked", what)
	}
}

var errInjected = errors.New("injected")

var (
	_ Stage   = (*probe)(nil)
	_ Remover = (*probe)(nil)
)
