package e2e

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// asNobody runs a shell command as the unprivileged user nobody and
// reports whether it succeeded, with its output.
func asNobody(t *testing.T, script string) (bool, string) {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	return err == nil, string(out)
}

// A local user without privileges cannot read, write or plant anything in
// a running container through the run or state directories, while the
// containers (with and without a user namespace, with a volume) still
// start and work (TSF-ISO, OS-05).
func TestLocalUsersCannotReachContainers(t *testing.T) {
	d := startDaemon(t)
	d.installGuestOS()
	d.create("web", "volumes { name: \"data\" mount_point: \"/data\" }\n")
	d.create("flat", "userns: false\n")
	for _, n := range []string{"web", "flat"} {
		d.must("start", n)
		if out, code := d.exec(n, "echo secret > /root/secret && cat /root/secret"); code != 0 || !strings.Contains(out, "secret") {
			t.Fatalf("%s does not work: %d %q", n, code, out)
		}
	}
	var wrapped struct {
		Containers []struct {
			UUID string `json:"uuid"`
			Name string `json:"name"`
		} `json:"containers"`
	}
	if err := json.Unmarshal([]byte(d.must("list", "--output", "json")), &wrapped); err != nil {
		t.Fatal(err)
	}
	list := wrapped.Containers
	if len(list) != 2 {
		t.Fatalf("list: %v", list)
	}
	for _, c := range list {
		run := filepath.Join(d.run, "containers", c.UUID)
		state := filepath.Join(d.stateDir, "containers", c.UUID)
		for _, attempt := range []string{
			"ls " + run,
			"ls " + run + "/rootfs",
			"cat " + run + "/rootfs/root/secret",
			"touch " + run + "/rootfs/tmp/planted",
			"ln -s /etc/shadow " + run + "/rootfs/tmp/link",
			"cat " + run + "/console",
			"cat " + run + "/bundle/config.json",
			"ls " + state,
			"cat " + state + "/data/upper/root/secret",
			"touch " + state + "/data/upper/tmp/planted",
			"ls " + state + "/volumes/data",
			"cat " + state + "/config.conf",
		} {
			if ok, out := asNobody(t, attempt); ok {
				t.Errorf("%s: as nobody, %q succeeded: %s", c.Name, attempt, out)
			}
		}
	}
	if out, code := d.exec("web", "echo vol > /data/v && cat /data/v"); code != 0 || !strings.Contains(out, "vol") {
		t.Errorf("volume in a user-namespaced container: %d %q", code, out)
	}
	// The containers are unaffected and still work.
	for _, n := range []string{"web", "flat"} {
		if out, code := d.exec(n, "cat /root/secret; ls /tmp"); code != 0 || !strings.Contains(out, "secret") || strings.Contains(out, "planted") {
			t.Errorf("%s after the attempts: %d %q", n, code, out)
		}
		d.must("stop", n)
		d.must("start", n)
	}
}
