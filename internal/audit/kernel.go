package audit

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	libaudit "github.com/elastic/go-libaudit/v2"
	"github.com/elastic/go-libaudit/v2/auparse"
)

// Attributor names the container a process belongs to (by its cgroup, or
// its uid's range): name and id, or ok false for a host process.
type Attributor func(pid, uid int) (name, id string, ok bool)

// WatchSeccomp listens to the kernel audit multicast group (beside any
// running auditd) and records each seccomp denial in a container
// (`container.seccomp`, with the syscall and the process), at most
// perSecond records per container each second plus a summary of the rest.
// Containers' seccomp profiles log their denials (SECCOMP_FILTER_FLAG_LOG).
func WatchSeccomp(ctx context.Context, sink Recorder, attribute Attributor, perSecond int, log *slog.Logger) error {
	c, err := libaudit.NewMulticastAuditClient(nil)
	if err != nil {
		return fmt.Errorf("kernel audit multicast: %w", err)
	}
	go func() { <-ctx.Done(); c.Close() }()
	lim := &Limiter{PerSecond: perSecond}
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				for _, x := range lim.Flush(now) {
					sink.Record(ctx, Event{Type: "container", Operation: "container.seccomp.summary", Object: x.Label + "/" + x.Key, Outcome: Failure,
						Reason: fmt.Sprintf("%d more denied system calls not recorded one by one (limit %d per second)", x.N, perSecond)})
				}
			}
		}
	}()
	for ctx.Err() == nil {
		raw, err := c.Receive(false)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			log.Warn("kernel audit", "err", err)
			continue
		}
		if raw.Type != auparse.AUDIT_SECCOMP {
			continue
		}
		f := fields(string(raw.Data))
		pid, _ := strconv.Atoi(f["pid"])
		uid, _ := strconv.Atoi(f["uid"])
		name, id, ok := attribute(pid, uid)
		if !ok {
			continue
		}
		if !lim.Allow(id, name, time.Now()) {
			continue
		}
		sc := f["syscall"]
		if n, err := strconv.Atoi(sc); err == nil {
			if s, ok := syscallName(f["arch"], n); ok {
				sc = s
			}
		}
		sink.Record(ctx, Event{Type: "container", Operation: "container.seccomp", Object: name + "/" + id, Outcome: Failure,
			Reason: fmt.Sprintf("system call %s denied by the seccomp profile (process %s, pid %d, uid %d)", sc, strings.Trim(f["comm"], `"`), pid, uid)})
	}
	return nil
}

// fields splits an audit record's key=value pairs.
func fields(s string) map[string]string {
	out := map[string]string{}
	if i := strings.Index(s, "): "); i >= 0 {
		s = s[i+3:]
	}
	for _, kv := range strings.Fields(s) {
		if k, v, ok := strings.Cut(kv, "="); ok {
			out[k] = v
		}
	}
	return out
}

// syscallName names a syscall number of an audit arch (AUDIT_ARCH_*).
func syscallName(arch string, n int) (string, bool) {
	table := map[string]string{"c000003e": "x86_64", "c00000b7": "aarch64", "40000003": "i386", "40000028": "arm"}[arch]
	s, ok := auparse.AuditSyscalls[table][n]
	return s, ok
}
