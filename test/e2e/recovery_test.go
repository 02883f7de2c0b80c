package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// loopsInUse counts attached loop devices.
func loopsInUse() int {
	n := 0
	ms, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for range ms {
		n++
	}
	return n
}

// cgroupsOf lists cgroup directories named after a container.
func cgroupsOf(uuid string) []string {
	a, _ := filepath.Glob("/sys/fs/cgroup/*/cml/" + uuid)
	b, _ := filepath.Glob("/sys/fs/cgroup/cml/" + uuid)
	return append(a, b...)
}

func uuidOf(t *testing.T, d *daemon, name string) string {
	return strings.Fields(d.must("state", name))[1]
}

// TestCrashRecovery: cmld killed with SIGKILL while containers run re-adopts
// them when started again; a container that died meanwhile is cleaned up
// without leaking mounts, loop devices, cgroups or runtime state.
func TestCrashRecovery(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	loops := loopsInUse()
	d.create("survivor", "")
	d.create("victim", "")
	d.must("start", "survivor")
	d.must("start", "victim")
	victimUUID := uuidOf(t, d, "victim")

	d.crash()
	// While the daemon is down, the victim's init dies.
	pidb, err := os.ReadFile(filepath.Join(d.run, "containers", victimUUID, "init.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(pidb)))
	syscall.Kill(pid, syscall.SIGKILL)
	time.Sleep(200 * time.Millisecond)

	d.start()
	if s := d.state("survivor"); s != "RUNNING" {
		t.Fatalf("survivor = %s after restart, want RUNNING (re-adopted)", s)
	}
	if out, code := d.exec("survivor", "echo alive"); code != 0 || strings.TrimSpace(out) != "alive" {
		t.Errorf("exec after re-adoption: %q %d", out, code)
	}
	if s := d.state("victim"); s != "STOPPED" {
		t.Errorf("victim = %s after restart, want STOPPED", s)
	}
	if mps := mountsUnder(t, filepath.Join(d.run, "containers", victimUUID)); len(mps) != 0 {
		t.Errorf("victim's mounts leaked: %v", mps)
	}
	if cg := cgroupsOf(victimUUID); len(cg) != 0 {
		t.Errorf("victim's cgroups leaked: %v", cg)
	}
	// The re-adopted container's exit is still noticed.
	d.must("stop", "survivor")
	if mps := mountsUnder(t, d.run); len(mps) != 0 {
		t.Errorf("mounts left after stopping everything: %v", mps)
	}
	if n := loopsInUse(); n > loops {
		t.Errorf("loop devices leaked: %d in use, %d before", n, loops)
	}
	// The victim starts again from a clean slate.
	d.must("start", "victim")
	d.must("stop", "victim")
}

// TestRepeatedCrashes: a daemon killed again and again keeps re-adopting
// the same container and converges to a consistent state.
func TestRepeatedCrashes(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("c1", "")
	d.must("start", "c1")
	for i := 0; i < 3; i++ {
		d.crash()
		d.start()
		if s := d.state("c1"); s != "RUNNING" {
			t.Fatalf("after crash %d: c1 = %s", i, s)
		}
	}
	d.must("stop", "c1")
	if mps := mountsUnder(t, d.run); len(mps) != 0 {
		t.Errorf("mounts left: %v", mps)
	}
}
