package seccomp

import (
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// action returns what profile p does for a call of name with no argument
// filter, and whether a rule with arguments exists for it.
func action(p *specs.LinuxSeccomp, name string) (specs.LinuxSeccompAction, bool) {
	for _, r := range p.Syscalls {
		for _, n := range r.Names {
			if n == name {
				return r.Action, len(r.Args) > 0
			}
		}
	}
	return p.DefaultAction, false
}

// The profile is an allow-list: anything not listed fails with EPERM, and
// the escapes a container's root must not have are not listed.
func TestDefaultProfileDeniesEscapes(t *testing.T) {
	p := Default(Options{})
	if p.DefaultAction != specs.ActErrno || p.DefaultErrnoRet == nil || *p.DefaultErrnoRet != uint(unix.EPERM) {
		t.Fatalf("default action %s errno %v, want EPERM", p.DefaultAction, p.DefaultErrnoRet)
	}
	for _, name := range []string{
		"unshare", "setns", "mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsmount",
		"keyctl", "add_key", "request_key", "bpf", "perf_event_open", "ptrace", "process_vm_readv",
		"process_vm_writev", "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
		"reboot", "swapon", "swapoff", "acct", "quotactl", "open_by_handle_at", "userfaultfd",
		"settimeofday", "clock_settime", "adjtimex",
	} {
		if a, _ := action(p, name); a == specs.ActAllow {
			t.Errorf("%s is allowed", name)
		}
	}
	// clone only without namespace flags; clone3 (flags in memory, not
	// filterable) fails with ENOSYS so libcs fall back to clone.
	if a, args := action(p, "clone"); a != specs.ActAllow || !args {
		t.Errorf("clone: %s, argument filter %t", a, args)
	}
	if a, _ := action(p, "clone3"); a != specs.ActErrno {
		t.Errorf("clone3: %s", a)
	}
	for _, name := range []string{"read", "write", "openat", "execve", "exit_group", "futex", "epoll_wait", "socket"} {
		if a, _ := action(p, name); a != specs.ActAllow {
			t.Errorf("%s is not allowed; services need it", name)
		}
	}
}

// allow_system_time (IAM-02) adds exactly the clock setters.
func TestAllowClockAddsOnlyClockSetters(t *testing.T) {
	p := Default(Options{AllowClock: true})
	for _, name := range clockSetters {
		if a, _ := action(p, name); a != specs.ActAllow {
			t.Errorf("%s not allowed with AllowClock", name)
		}
	}
	if a, _ := action(p, "mount"); a == specs.ActAllow {
		t.Error("AllowClock allowed mount")
	}
}
