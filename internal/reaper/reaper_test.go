package reaper

import (
	"context"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cmlproject/cml/internal/testutil"
)

// subreaper makes the test process a child subreaper, as cmld is.
func subreaper(t *testing.T) *Reaper {
	t.Helper()
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	r := New(nil)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go r.Run(ctx)
	return r
}

// orphan starts cmd in a new pid namespace through a parent that is killed
// at once, so the process becomes this process's inherited child, as a
// container init does when runc exits. It returns the orphan's pid.
func orphan(t *testing.T, args ...string) int {
	t.Helper()
	r, w, _ := os.Pipe()
	defer r.Close()
	// unshare forks args into a new pid namespace; sh prints the pid of
	// the forked child (as seen from here) and the parent dies.
	cmd := exec.Command("unshare", append([]string{"--pid", "--fork", "--kill-child=SIGCONT", "--"}, args...)...)
	cmd.Stdout = w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	// The child of unshare is the one in the new namespace.
	var pid int
	for i := 0; i < 1000 && pid == 0; i++ {
		for _, c := range childrenOf(cmd.Process.Pid) {
			pid = c
		}
		time.Sleep(time.Millisecond)
	}
	if pid == 0 {
		t.Fatal("no child in the new pid namespace")
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	return pid
}

func childrenOf(pid int) []int {
	b, _ := os.ReadFile("/proc/" + itoa(pid) + "/task/" + itoa(pid) + "/children")
	var out []int
	n := 0
	in := false
	for _, c := range b {
		if c >= '0' && c <= '9' {
			n, in = n*10+int(c-'0'), true
		} else if in {
			out, n, in = append(out, n), 0, false
		}
	}
	return out
}

func itoa(i int) string { return string(appendInt(nil, i)) }

func appendInt(b []byte, i int) []byte {
	if i >= 10 {
		b = appendInt(b, i/10)
	}
	return append(b, byte('0'+i%10))
}

// An inherited container process is reaped and its status delivered,
// exit code and signal apart; the commands cmld runs itself keep theirs.
func TestReapsInheritedAndLeavesOwnCommands(t *testing.T) {
	testutil.RequireRoot(t) // a new pid namespace
	r := subreaper(t)

	pid := orphan(t, "sh", "-c", "sleep 0.3; exit 130")
	select {
	case e := <-r.Wait(pid, time.Now().Add(-time.Minute)):
		if !e.Known || e.Code != 130 || e.Signal != 0 {
			t.Errorf("exit 130 reported as %+v (%s)", e, e)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("inherited process never reaped")
	}

	pid = orphan(t, "sleep", "30")
	ch := r.Wait(pid, time.Now().Add(-time.Minute))
	unix.Kill(pid, unix.SIGKILL) // a pid namespace init ignores signals it has no handler for
	select {
	case e := <-ch:
		if e.Signal != syscall.SIGKILL || e.Code != 0 {
			t.Errorf("SIGKILL reported as %+v", e)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("killed process never reaped")
	}

	// cmld's own commands: exec.Cmd must still get every status.
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := exec.Command("sh", "-c", "exit 3").Run(); err == nil {
				t.Error("exit 3 reported as success")
			} else if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
				t.Errorf("own command's status stolen: %v", err)
			}
		}()
	}
	wg.Wait()
}

// Nobody waits for the init of a cancelled start: it is reaped anyway
// (no zombie), and a later Wait for a reused pid ignores its status.
func TestUnclaimedExitsAreReapedAndExpire(t *testing.T) {
	testutil.RequireRoot(t)
	r := subreaper(t)
	before := time.Now()
	pid := orphan(t, "sleep", "0.2")
	for i := 0; i < 2000; i++ {
		b, err := os.ReadFile("/proc/" + itoa(pid) + "/stat")
		if err != nil {
			break // reaped
		}
		if i == 1999 {
			t.Fatalf("zombie left: %s", b)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, ok := r.claim(pid, time.Now().Add(time.Hour)); ok {
		t.Error("a status older than the waiter was handed out")
	}
	// The status is stored just after the process is reaped.
	for i := 0; ; i++ {
		if _, ok := r.claim(pid, before); ok {
			break
		}
		if i == 1000 {
			t.Fatal("the unclaimed status was not kept")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestExitString(t *testing.T) {
	for _, tc := range []struct {
		e    Exit
		want string
	}{
		{Exit{Code: 130, Known: true}, "exited with status 130"},
		{Exit{Signal: syscall.SIGINT, Known: true}, "killed by signal 2 (SIGINT)"},
		{Exit{}, "exited (status unknown: not a child of this daemon)"},
	} {
		if got := tc.e.String(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.e, got, tc.want)
		}
	}
}

// runc 1.2+ runs from a memfd by descriptor: until it renames itself its
// name is that number, and such a child is runc's, not one of cmld's.
func TestNumericNamesAreRuncs(t *testing.T) {
	for name, want := range map[string]bool{"6": true, "12": true, "": false, "runc": false, "6a": false, "losetup": false} {
		if got := numeric([]byte(name)); got != want {
			t.Errorf("numeric(%q) = %t", name, got)
		}
	}
}
