package bench

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
)

// cpuSeconds is the user+system CPU time of process pid so far.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

// consoleFlood measures what a container writing to its console without
// pause costs cmld (the container has no user namespace so that an exec'd
// process may reopen init's console, /proc/1/fd/1): its CPU seconds per MiB of console output, and how
// fast the output went through (cmld reads at most its console rate).
func consoleFlood(w io.Writer, ctl func(...string) error, conf func(string, ...string) string, cmld, mib int) error {
	if mib <= 0 {
		mib = 8
	}
	if err := ctl("create", conf("flood", "userns: false\n")); err != nil {
		return err
	}
	if err := ctl("start", "flood"); err != nil {
		return err
	}
	defer ctl("stop", "flood")
	cpu0, t0 := cpuSeconds(cmld), time.Now()
	script := fmt.Sprintf("head -c %d /dev/zero | tr '\\0' x > /proc/1/fd/1", mib<<20)
	if err := ctl("exec", "flood", "--", "sh", "-c", script); err != nil {
		return err
	}
	cpu, wall := cpuSeconds(cmld)-cpu0, time.Since(t0)
	// What cmld spends anyway in as long (its timers, the exec call).
	idle0 := cpuSeconds(cmld)
	if err := ctl("exec", "flood", "--", "sh", "-c", fmt.Sprintf("sleep %.1f", wall.Seconds())); err != nil {
		return err
	}
	idle := cpuSeconds(cmld) - idle0
	fmt.Fprintf(w, "console flood: %d MiB written to a container's console without pause\n", mib)
	fmt.Fprintf(w, "  cmld CPU per MiB of console output   %7.2f ms   (%.2f s of CPU in %.1f s; %.2f s in as long idle)\n", max(cpu-idle, 0)*1000/float64(mib), cpu, wall.Seconds(), idle)
	fmt.Fprintf(w, "  cmld's share of one core              %6.1f %%   (cmld reads consoles at its console rate)\n", 100*cpu/wall.Seconds())
	return nil
}
