package container

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/errdefs"
)

func TestStartStopRemove(t *testing.T) {
	f := newFixture(t)
	f.create("a", "")
	c, err := f.m.Start(t.Context(), "a", StartOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c.GetState() != Running || c.GetPid() == 0 {
		t.Fatalf("after start: %v", c)
	}
	if f.tpm.count() != 1 {
		t.Errorf("%d measurements, want 1", f.tpm.count())
	}
	timings, err := f.m.RunTimings("a")
	if err != nil || len(timings) != 6 {
		t.Errorf("run timings %v, %v: want verify, devices, probe, measure, bundle, runtime", timings, err)
	}
	if _, err := f.m.Start(t.Context(), "a", StartOptions{}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("second start: %v", err)
	}
	c, err = f.m.Stop(t.Context(), "a", time.Second)
	if err != nil || c.GetState() != Stopped {
		t.Fatalf("stop: %v %v", c, err)
	}
	if c.GetExitSignal() != int32(syscall.SIGTERM) || c.GetExitStatus() != -1 {
		t.Errorf("exit after SIGTERM: status %d signal %d", c.GetExitStatus(), c.GetExitSignal())
	}
	id := c.GetUuid()
	if f.probe.released[id] == 0 {
		t.Error("stages not released after exit")
	}
	if err := f.m.Remove(t.Context(), "a", nil); err != nil {
		t.Fatal(err)
	}
	if f.probe.removed[id] != 1 {
		t.Error("Remover stage not called")
	}
	if _, err := f.m.State("a"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("state after remove: %v", err)
	}
}

// Bug 7: an init that calls exit(130) is not "killed by signal 2".
func TestExitCodeAndSignalStayApart(t *testing.T) {
	f := newFixture(t)
	f.create("a", "")
	for _, tc := range []struct {
		exit   exitT
		status int32
		signal int32
		reason string
	}{
		{exitCode(130), 130, 0, "init exited with status 130"},
		{exitT{Signal: syscall.SIGINT, Known: true}, -1, 2, "init killed by signal 2 (SIGINT)"},
		{exitT{}, -1, 0, "status unknown"},
	} {
		if _, err := f.m.Start(t.Context(), "a", StartOptions{}); err != nil {
			t.Fatal(err)
		}
		f.rt.Exit(f.id("a"), tc.exit)
		f.waitState("a", Stopped)
		c, _ := f.m.State("a")
		if c.GetExitStatus() != tc.status || c.GetExitSignal() != tc.signal || !strings.Contains(c.GetReason(), tc.reason) {
			t.Errorf("%+v: status %d signal %d reason %q", tc.exit, c.GetExitStatus(), c.GetExitSignal(), c.GetReason())
		}
		// The audit record keeps them apart too.
		var last audit.Event
		for i := 0; i < 200 && last.Operation != "container.exit"; i++ {
			if evs := f.audit.Events(); len(evs) > 0 {
				last = evs[len(evs)-1]
			}
			time.Sleep(time.Millisecond)
		}
		code := -1
		if last.ExitCode != nil {
			code = *last.ExitCode
		}
		if int32(code) != tc.status || int32(last.ExitSignal) != tc.signal {
			t.Errorf("%+v: audit exit_code %d exit_signal %d", tc.exit, code, last.ExitSignal)
		}
	}
}

// Bug 1: freeze racing init's exit must not leave a container RUNNING
// (or FROZEN) with no process; afterwards everything works.
func TestFreezeRacingExit(t *testing.T) {
	f := newFixture(t)
	f.create("a", "")
	if _, err := f.m.Start(t.Context(), "a", StartOptions{}); err != nil {
		t.Fatal(err)
	}
	id := f.id("a")
	inPause := make(chan struct{})
	f.rt.Hook("pause", func(ctx context.Context, _ string) error {
		close(inPause)
		// init dies while runc pause runs; the watcher records it.
		f.rt.Exit(id, exitT{Signal: syscall.SIGKILL, Known: true})
		f.waitState("a", Stopped)
		return nil
	})
	_, err := f.m.Freeze(t.Context(), "a")
	<-inPause
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("freeze of a container that died meanwhile: %v", err)
	}
	if s := f.state("a"); s != Stopped {
		t.Fatalf("after the race: %s, want STOPPED", s)
	}
	f.rt.Hook("pause", nil)
	if _, err := f.m.Start(t.Context(), "a", StartOptions{}); err != nil {
		t.Fatalf("start after the race: %v", err)
	}
	if _, err := f.m.Freeze(t.Context(), "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.m.Stop(t.Context(), "a", time.Second); err != nil {
		t.Fatal(err)
	}
	if err := f.m.Remove(t.Context(), "a", nil); err != nil {
		t.Fatalf("remove after the race: %v", err)
	}
}

// Bug 1, start side: init dying before Start records RUNNING leaves the
// container STOPPED, not RUNNING.
func TestStartRacingExit(t *testing.T) {
	f := newFixture(t)
	f.create("a", "")
	id := f.id("a")
	f.rt.Hook("run", func(ctx context.Context, _ string) error {
		go func() {
			for !f.rt.Exit(id, exitCode(1)) {
				time.Sleep(time.Millisecond)
			}
		}()
		return nil
	})
	c, err := f.m.Start(t.Context(), "a", StartOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c.GetState() == Running {
		// The exit may land after Start returned; then it must win.
		f.waitState("a", Stopped)
	}
	f.waitState("a", Stopped)
	f.rt.Hook("run", nil)
	if _, err := f.m.Start(t.Context(), "a", StartOptions{}); err != nil {
		t.Fatalf("start after an early exit: %v", err)
	}
}

// Bug 2: a start queued behind a removal does not run on the removed
// container (no false integrity alarm, no events for it), nor does an
// update.
func TestStartQueuedBehindRemove(t *testing.T) {
	f := newFixture(t)
	f.create("a", "")
	id := f.id("a")
	release := f.probe.block()
	removed := make(chan error)
	go func() { removed <- f.m.Remove(context.Background(), "a", nil) }()
	<-f.probe.entered // Remove holds a's operation lock now
	started := make(chan error)
	updated := make(chan error)
	go func() { _, err := f.m.Start(context.Background(), id, StartOptions{}); started <- err }()
	go func() {
		_, err := f.m.UpdateConfig(context.Background(), id, ConfigFile{Text: []byte("name: \"a\"\nguest_os: \"busybox\"\n")})
		updated <- err
	}()
	time.Sleep(50 * time.Millisecond) // let both queue on the lock
	release()
	if err := <-removed; err != nil {
		t.Fatal(err)
	}
	if err := <-started; !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("start after remove: %v, want not found", err)
	}
	if err := <-updated; !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("update after remove: %v, want not found", err)
	}
	for _, op := range f.audit.Operations() {
		if strings.HasPrefix(op, "container.verify") || strings.HasPrefix(op, "container.run") {
			t.Errorf("removed container audited %s", op)
		}
	}
	for {
		select {
		case e := <-f.events:
			if e.GetContainer().GetUuid() == id && e.GetContainer().GetReason() != "removed" && e.GetContainer().GetState() != Stopped {
				t.Errorf("event for the removed container: %v", e)
			}
			continue
		default:
		}
		break
	}
	if len(f.rt.Running()) != 0 || f.rt.Calls("run") != 0 {
		t.Error("the runtime ran the removed container")
	}
}

// Bug 4: slow work on one container (a stage, a removal) does not hold
// the manager lock: list, state, create and other containers' starts go
// on meanwhile.
func TestSlowWorkDoesNotBlockOthers(t *testing.T) {
	f := newFixture(t)
	f.create("slow", "")
	f.create("other", "")
	release := f.probe.block()
	defer release()
	go f.m.Start(context.Background(), "slow", StartOptions{})
	<-f.probe.entered
	go f.m.Remove(context.Background(), "other", nil)
	within(t, "list during a blocked start", func() { f.m.List() })
	within(t, "state during a blocked start", func() { f.m.State("slow") })
	within(t, "create during a blocked start", func() { f.create("third", "") })
	within(t, "users of a guest OS", func() { f.m.GuestOSUsers("busybox", 1) })
	release()
	f.waitState("slow", Running)
}

// Bug 6: a client that goes away stops the start before anything is
// measured or run, and the stages done so far are released.
func TestCancelledStartMeasuresAndRunsNothing(t *testing.T) {
	f := newFixture(t)
	f.create("a", "")
	id := f.id("a")
	release := f.probe.block()
	defer release()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { _, err := f.m.Start(ctx, "a", StartOptions{}); done <- err }()
	<-f.probe.entered
	cancel()
	err := <-done
	if !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled start: %v", err)
	}
	if f.tpm.count() != 0 || f.rt.Calls("run") != 0 {
		t.Errorf("cancelled start measured %d times, ran %d times", f.tpm.count(), f.rt.Calls("run"))
	}
	if s := f.state("a"); s != Failed {
		t.Errorf("after a cancelled start: %s", s)
	}
	release()
	if _, err := f.m.Start(t.Context(), "a", StartOptions{}); err != nil {
		t.Errorf("start after a cancelled one: %v", err)
	}
	_ = id
}

// Bug 10: a start whose audit record cannot be written does not stay
// running, and a removal that cannot be audited does not happen.
func TestAuditFailsClosed(t *testing.T) {
	f := newFixture(t)
	f.create("a", "")
	f.audit.Fail(errors.New("no space left on device"))
	_, err := f.m.Start(t.Context(), "a", StartOptions{})
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("start with a broken audit trail: %v", err)
	}
	if len(f.rt.Running()) != 0 {
		t.Error("an unaudited container is running")
	}
	if err := f.m.Remove(t.Context(), "a", nil); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("remove with a broken audit trail: %v", err)
	}
	if _, err := f.m.State("a"); err != nil {
		t.Errorf("unaudited remove removed: %v", err)
	}
	f.audit.Fail(nil)
	if _, err := f.m.Start(t.Context(), "a", StartOptions{}); err != nil {
		t.Fatal(err)
	}
}

// A failing stage releases the stages before it, in reverse, and leaves
// no device reserved.
func TestFailedStageReleasesEarlierStages(t *testing.T) {
	f := newFixture(t)
	f.create("a", `assign_dev: "c 4:64 rwm"`)
	f.create("b", `assign_dev: "c 4:64 rwm"`)
	f.probe.fail = errInjected
	if _, err := f.m.Start(t.Context(), "a", StartOptions{}); !errors.Is(err, errInjected) {
		t.Fatalf("start: %v", err)
	}
	f.probe.fail = nil
	// a's device reservation was released: b may take the device.
	if _, err := f.m.Start(t.Context(), "b", StartOptions{}); err != nil {
		t.Fatalf("b after a's failed start: %v", err)
	}
	if _, err := f.m.Start(t.Context(), "a", StartOptions{}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("a while b holds the device: %v", err)
	}
}

// Concurrency: many clients start, stop, freeze, thaw, kill, update and
// remove the same containers at once, and inits die on their own. Run
// under -race. Afterwards every container's state agrees with the runtime.
func TestConcurrentOperations(t *testing.T) {
	f := newFixture(t)
	names := []string{"c0", "c1", "c2"}
	for _, n := range names {
		f.create(n, "")
	}
	ctx := t.Context()
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 60; i++ {
				n := names[(w+i)%len(names)]
				switch (w*7 + i) % 9 {
				case 0, 1:
					f.m.Start(ctx, n, StartOptions{})
				case 2:
					f.m.Stop(ctx, n, 50*time.Millisecond)
				case 3:
					f.m.Freeze(ctx, n)
				case 4:
					f.m.Unfreeze(ctx, n)
				case 5:
					f.m.Kill(ctx, n, syscall.SIGUSR1)
				case 6:
					f.m.UpdateConfig(ctx, n, ConfigFile{Text: []byte(fmt.Sprintf("name: %q\nguest_os: \"busybox\"\nallow_autostart: %t\n", n, i%2 == 0))})
				case 7:
					if c, err := f.m.State(n); err == nil {
						f.rt.Exit(c.GetUuid(), exitCode(i))
					}
				case 8:
					if err := f.m.Remove(ctx, n, nil); err == nil {
						f.m.Create(ctx, ConfigFile{Source: n, Text: []byte(fmt.Sprintf("name: %q\nguest_os: \"busybox\"\n", n))})
					}
				}
				f.m.List()
			}
		}(w)
	}
	wg.Wait()
	// Let exits settle, then compare with the runtime.
	for _, n := range names {
		c, err := f.m.State(n)
		if err != nil {
			continue
		}
		switch c.GetState() {
		case Running, Frozen:
			found := false
			for _, id := range f.rt.Running() {
				found = found || id == c.GetUuid()
			}
			if !found {
				t.Errorf("%s is %s but the runtime has no init for it", n, c.GetState())
			}
		case Starting, Freezing, Stopping:
			t.Errorf("%s stuck in %s after every client finished", n, c.GetState())
		}
		if c.GetState() == Running || c.GetState() == Frozen {
			if _, err := f.m.Stop(ctx, n, 50*time.Millisecond); err != nil {
				t.Errorf("stop %s at the end: %v", n, err)
			}
		}
		if err := f.m.Remove(ctx, n, nil); err != nil {
			t.Errorf("remove %s at the end: %v", n, err)
		}
	}
}

// Item 6a: a device assigned exclusively is exclusive against every rule
// of every running container, both ways, wildcard minors included.
func TestDeviceExclusivityCoversAllowRules(t *testing.T) {
	for _, tc := range []struct {
		first, second string
		conflict      bool
	}{
		{`assign_dev: "c 4:64 rwm"`, `assign_dev: "c 4:64 rwm"`, true},
		{`assign_dev: "c 4:64 rwm"`, `allow_dev: "c 4:64 r"`, true},
		{`assign_dev: "c 4:64 rwm"`, `allow_dev: "c 4:* rwm"`, true},
		{`allow_dev: "c 4:64 rw"`, `assign_dev: "c 4:64 rwm"`, true},
		{`allow_dev: "c 4:* rw"`, `assign_dev: "c 4:64 rwm"`, true},
		{`assign_dev: "c 4:64 rwm"`, `allow_dev: "c 4:65 rwm"`, false},
		{`assign_dev: "c 4:64 rwm"`, `allow_dev: "b 4:64 r"`, false},
		{`allow_dev: "c 4:64 rw"`, `allow_dev: "c 4:64 rw"`, false},
	} {
		t.Run(tc.first+" then "+tc.second, func(t *testing.T) {
			f := newFixture(t)
			f.create("first", tc.first)
			f.create("second", tc.second)
			if _, err := f.m.Start(t.Context(), "first", StartOptions{}); err != nil {
				t.Fatal(err)
			}
			_, err := f.m.Start(t.Context(), "second", StartOptions{})
			if tc.conflict && !errors.Is(err, errdefs.ErrFailedPrecondition) {
				t.Errorf("second started beside first: %v", err)
			}
			if !tc.conflict && err != nil {
				t.Errorf("second refused: %v", err)
			}
			if tc.conflict {
				f.m.Stop(t.Context(), "first", 0)
				if _, err := f.m.Start(t.Context(), "second", StartOptions{}); err != nil {
					t.Errorf("second after first stopped: %v", err)
				}
			}
		})
	}
}
