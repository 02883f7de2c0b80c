package e2e

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestLifecycle(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("web", "init_env: \"GREETING=hi\"\nstop_timeout: 2\n")

	// events: a stream of state changes, current state first.
	ev := exec.Command(filepath.Join(binDir, "cmlctl"), "--socket", d.socket, "events", "web")
	evOut := &syncBuffer{}
	ev.Stdout = evOut
	if err := ev.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ev.Process.Kill(); ev.Wait() })
	// The stream opens with the current state; wait for it so no change
	// is missed.
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(evOut.String(), " web STOPPED"); {
		if time.Now().After(deadline) {
			t.Fatalf("events stream did not start with the current state: %q", evOut.String())
		}
		time.Sleep(10 * time.Millisecond)
	}

	d.must("start", "web")
	if s := d.state("web"); s != "RUNNING" {
		t.Fatalf("state after start = %s", s)
	}
	d.refuse("is RUNNING", "start", "web")

	t.Run("exec streams output and propagates the exit status", func(t *testing.T) {
		out, code := d.exec("web", "echo $GREETING; exit 7")
		if code != 7 || strings.TrimSpace(out) != "hi" {
			t.Errorf("exec = %q, exit %d; want hi, 7", out, code)
		}
		cmd := exec.Command(filepath.Join(binDir, "cmlctl"), "--socket", d.socket, "exec", "web", "--", "cat")
		cmd.Stdin = strings.NewReader("via stdin\n")
		b, err := cmd.Output()
		if err != nil || string(b) != "via stdin\n" {
			t.Errorf("stdin round trip = %q, %v", b, err)
		}
	})
	t.Run("logs hold the console output", func(t *testing.T) {
		if out := d.must("logs", "web"); !strings.Contains(out, "demo guest OS up: hostname web") {
			t.Errorf("logs = %q", out)
		}
	})
	t.Run("json output", func(t *testing.T) {
		var st struct {
			Name  string `json:"name"`
			State string `json:"state"`
			Pid   int    `json:"pid"`
		}
		if err := json.Unmarshal([]byte(d.must("state", "web", "--output", "json")), &st); err != nil {
			t.Fatal(err)
		}
		if st.Name != "web" || st.State != "RUNNING" || st.Pid == 0 {
			t.Errorf("state json = %+v", st)
		}
		var l struct{ Containers []json.RawMessage }
		if err := json.Unmarshal([]byte(d.must("list", "-o", "json")), &l); err != nil || len(l.Containers) != 1 {
			t.Errorf("list json: %v %d", err, len(l.Containers))
		}
	})
	t.Run("freeze and unfreeze", func(t *testing.T) {
		d.must("freeze", "web")
		if s := d.state("web"); s != "FROZEN" {
			t.Errorf("state = %s, want FROZEN", s)
		}
		d.refuse("not RUNNING", "exec", "web", "--", "true")
		d.must("unfreeze", "web")
		if s := d.state("web"); s != "RUNNING" {
			t.Errorf("state = %s, want RUNNING", s)
		}
	})
	t.Run("stop sends SIGTERM and init exits cleanly", func(t *testing.T) {
		out := d.must("stop", "web")
		if !strings.Contains(out, "STOPPED") || !strings.Contains(out, "status 0") {
			t.Errorf("stop = %q", out)
		}
		if out := d.must("logs", "web"); !strings.Contains(out, "SIGTERM received") {
			t.Errorf("init did not see SIGTERM: %q", out)
		}
		if mps := mountsUnder(t, d.run); len(mps) != 0 {
			t.Errorf("mounts left after stop: %v", mps)
		}
	})
	t.Run("config and update-config", func(t *testing.T) {
		if out := d.must("config", "web"); !strings.Contains(out, `GREETING=hi`) {
			t.Errorf("config = %q", out)
		}
		p := d.signedConfig("web2", "name: \"web\"\nguest_os: \"busybox\"\ninit_env: \"GREETING=bye\"\n")
		d.must("update-config", "web", p)
		d.must("start", "web")
		if out, _ := d.exec("web", "echo $GREETING"); strings.TrimSpace(out) != "bye" {
			t.Errorf("updated config not applied: %q", out)
		}
		d.must("stop", "web")
	})
	t.Run("remove", func(t *testing.T) {
		d.must("remove", "web")
		d.refuse("does not exist", "state", "web")
	})
	time.Sleep(100 * time.Millisecond)
	ev.Process.Kill()
	ev.Wait()
	seq := []string{"STOPPED", "STARTING", "RUNNING", "FREEZING", "FROZEN", "RUNNING", "STOPPING", "STOPPED"}
	got := evOut.String()
	pos := 0
	for _, s := range seq {
		i := strings.Index(got[pos:], " web "+s)
		if i < 0 {
			t.Fatalf("events stream lacks %s after offset %d:\n%s", s, pos, got)
		}
		pos += i + 1
	}
}

// syncBuffer is a bytes.Buffer safe for one writer and one reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestStopTimeoutKills: an init that ignores SIGTERM is killed after the
// stop timeout.
func TestStopTimeoutKills(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("stubborn", "init_env: \"DEMO_IGNORE_TERM=1\"\n")
	d.must("start", "stubborn")
	start := time.Now()
	out := d.must("stop", "--timeout", "1", "stubborn")
	if !strings.Contains(out, "signal 9") {
		t.Errorf("stop = %q, want init killed by signal 9", out)
	}
	if el := time.Since(start); el < time.Second {
		t.Errorf("stop returned after %v, before the 1 s timeout", el)
	}
}

// TestInitExitNoticed: when init exits by itself the daemon records the
// status and releases everything.
func TestInitExitNoticed(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("short", "init_env: \"DEMO_EXIT=3\"\n")
	d.must("start", "short")
	d.waitState("short", "STOPPED", 3*time.Second)
	if out := d.must("state", "short"); !strings.Contains(out, "status 3") {
		t.Errorf("state = %q, want exit status 3", out)
	}
	if mps := mountsUnder(t, d.run); len(mps) != 0 {
		t.Errorf("mounts left: %v", mps)
	}
}

// TestAutostart: allow_autostart containers start with the daemon.
func TestAutostart(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("auto", "allow_autostart: true\n")
	d.create("manual", "")
	d.cmd.Process.Signal(os.Interrupt)
	d.cmd.Wait()
	d.start()
	d.waitState("auto", "RUNNING", 5*time.Second)
	if s := d.state("manual"); s != "STOPPED" {
		t.Errorf("manual = %s", s)
	}
}

// TestAuditTrail: management operations are recorded with the caller's
// identity and their outcome.
func TestAuditTrail(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("a", "")
	d.ctl("start", "nosuch")
	var sawCreate, sawFailure bool
	for _, l := range d.auditLines() {
		var e struct {
			Operation string
			Subject   *struct{ UID, PID int }
			Object    string
			Outcome   string
			Reason    string
		}
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatalf("audit line is not JSON: %q", l)
		}
		if e.Operation == "control.Create" && e.Object == "a" && e.Outcome == "success" && e.Subject != nil && e.Subject.PID > 0 {
			sawCreate = true
		}
		if e.Operation == "control.Start" && e.Object == "nosuch" && e.Outcome == "failure" && strings.Contains(e.Reason, "does not exist") {
			sawFailure = true
		}
	}
	if !sawCreate || !sawFailure {
		t.Errorf("audit trail lacks create (%v) or failed start (%v):\n%s", sawCreate, sawFailure, strings.Join(d.auditLines(), "\n"))
	}
}

// Item 8: exec --tty gives the process a real terminal with a size (24x80
// when the client has no terminal of its own) and adds nothing to the
// output.
func TestExecTTY(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("t", "")
	d.must("start", "t")
	out := d.must("exec", "--tty", "t", "--", "sh", "-c", "tty; stty size")
	if !strings.HasPrefix(out, "/dev/pts/") || !strings.Contains(out, "24 80") {
		t.Errorf("exec --tty: %q", out)
	}
	if strings.ContainsRune(out, 0) || strings.Contains(out, "^@") {
		t.Errorf("stray NUL in %q", out)
	}
}
