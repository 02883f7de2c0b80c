// Package oci drives an OCI runtime (runc by default; crun, youki and runsc
// share its command line) and generates the bundles it runs.
//
// The runtime runs as a separate process on a bundle this package writes
// with opencontainers/runtime-spec; CML has no clone or namespace code of
// its own for containers. The spec built here is where the isolation
// defaults live (TSF-ISO, CR 7.7): namespaces, capabilities, seccomp,
// masked /proc and /sys paths, the device allow-list and cgroup limits.
package oci

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// DefaultCapabilities is the small set every container's processes keep.
// Docker's default minus MKNOD, NET_RAW, SETFCAP and AUDIT_WRITE: nothing
// a service needs to run, each an avenue for attack (CR 7.7, TSF-ISO).
var DefaultCapabilities = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
	"CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
}

// MaskedPaths are hidden from containers (bind-mounted over with /dev/null
// or an empty tmpfs).
var MaskedPaths = []string{
	"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
	"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
	"/sys/firmware", "/sys/devices/virtual/powercap", "/sys/kernel/debug", "/proc/sysrq-trigger",
}

// ReadonlyPaths are visible but read-only in containers.
var ReadonlyPaths = []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"}

// Device is a cgroup device rule; Path is set when the host has a node for
// it, which is then created in the container's /dev.
type Device struct {
	Type   string // "c" or "b"
	Major  int64  // -1 = any
	Minor  int64  // -1 = any
	Access string
	Path   string
	Mode   os.FileMode
}

// Mount is an additional bind mount.
type Mount struct {
	Source      string
	Destination string
	ReadOnly    bool
}

// SpecOptions is everything the daemon decides about one container.
type SpecOptions struct {
	Hostname       string
	Rootfs         string
	ReadonlyRootfs bool
	Args           []string
	Env            []string
	// UIDBase/IDCount map container ids 0..IDCount-1 to the host; IDCount 0
	// means no user namespace.
	UIDBase uint32
	IDCount uint32
	NetNS   bool
	// NetNSPath is a network namespace the host prepared (and may have
	// configured) for the container to join; empty makes a new one when
	// NetNS is set.
	NetNSPath    string
	MemoryBytes  int64 // 0 = unlimited
	NoSwap       bool  // set swap limit equal to memory (host supports it)
	PidsLimit    int64
	CPUs         string
	CPUWeight    uint32 // 1..10000, 0 = default
	CPUQuotaPct  uint32 // 0 = unlimited
	Capabilities []string
	Seccomp      *specs.LinuxSeccomp // nil = unconfined
	Devices      []Device
	Mounts       []Mount
	CgroupsPath  string
}

// defaultDevices are the device rules every container gets: null, zero,
// full, random, urandom, tty, console, ptmx and the pts slaves.
var defaultDevices = []specs.LinuxDeviceCgroup{
	{Allow: true, Type: "c", Major: i64(1), Minor: i64(3), Access: "rwm"},
	{Allow: true, Type: "c", Major: i64(1), Minor: i64(5), Access: "rwm"},
	{Allow: true, Type: "c", Major: i64(1), Minor: i64(7), Access: "rwm"},
	{Allow: true, Type: "c", Major: i64(1), Minor: i64(8), Access: "rwm"},
	{Allow: true, Type: "c", Major: i64(1), Minor: i64(9), Access: "rwm"},
	{Allow: true, Type: "c", Major: i64(5), Minor: i64(0), Access: "rwm"},
	{Allow: true, Type: "c", Major: i64(5), Minor: i64(1), Access: "rwm"},
	{Allow: true, Type: "c", Major: i64(5), Minor: i64(2), Access: "rwm"},
	{Allow: true, Type: "c", Major: i64(136), Minor: nil, Access: "rwm"},
}

func i64(v int64) *int64 { return &v }

// Spec builds the OCI runtime spec for a container.
func Spec(o SpecOptions) *specs.Spec {
	s := &specs.Spec{
		Version:  specs.Version,
		Hostname: o.Hostname,
		Root:     &specs.Root{Path: o.Rootfs, Readonly: o.ReadonlyRootfs},
		Process: &specs.Process{
			Args: o.Args,
			Env:  o.Env,
			Cwd:  "/",
			User: specs.User{UID: 0, GID: 0},
			// CLIP OS: no privilege elevation inside a container.
			NoNewPrivileges: true,
			Capabilities: &specs.LinuxCapabilities{
				Bounding:  o.Capabilities,
				Effective: o.Capabilities,
				Permitted: o.Capabilities,
			},
			Rlimits: []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 4096, Soft: 1024}},
		},
		Mounts: defaultMounts(o),
		Linux: &specs.Linux{
			CgroupsPath:   o.CgroupsPath,
			MaskedPaths:   MaskedPaths,
			ReadonlyPaths: ReadonlyPaths,
			Seccomp:       o.Seccomp,
			Resources:     resources(o),
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.MountNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.IPCNamespace},
				{Type: specs.CgroupNamespace},
			},
		},
	}
	if o.NetNS {
		s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: o.NetNSPath})
	}
	if o.IDCount > 0 {
		s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.UserNamespace})
		m := []specs.LinuxIDMapping{{ContainerID: 0, HostID: o.UIDBase, Size: o.IDCount}}
		s.Linux.UIDMappings = m
		s.Linux.GIDMappings = m
	}
	for _, d := range o.Devices {
		if d.Path == "" {
			continue
		}
		uid, gid := uint32(0), uint32(0)
		mode := d.Mode
		s.Linux.Devices = append(s.Linux.Devices, specs.LinuxDevice{
			Path: d.Path, Type: d.Type, Major: d.Major, Minor: d.Minor, FileMode: &mode, UID: &uid, GID: &gid,
		})
	}
	return s
}

func defaultMounts(o SpecOptions) []specs.Mount {
	ms := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
	}
	if (o.NetNS && o.NetNSPath == "") || o.IDCount == 0 {
		ms = append(ms, specs.Mount{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}})
	} else {
		// sysfs may be mounted only by the owner of the network namespace:
		// a user namespace without a network namespace of its own, or in
		// one cmld made (owned by the host), binds the host's read-only.
		ms = append(ms, specs.Mount{Destination: "/sys", Type: "none", Source: "/sys", Options: []string{"rbind", "nosuid", "noexec", "nodev", "ro"}})
	}
	ms = append(ms, specs.Mount{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}})
	if o.ReadonlyRootfs {
		for _, d := range []string{"/tmp", "/run"} {
			ms = append(ms, specs.Mount{Destination: d, Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777", "size=65536k"}})
		}
	}
	for _, m := range o.Mounts {
		opts := []string{"rbind", "nosuid", "nodev"}
		if m.ReadOnly {
			opts = append(opts, "ro")
		}
		ms = append(ms, specs.Mount{Destination: m.Destination, Type: "none", Source: m.Source, Options: opts})
	}
	return ms
}

func resources(o SpecOptions) *specs.LinuxResources {
	r := &specs.LinuxResources{
		// Deny every device, then allow the defaults and the config's
		// rules (CR 7.7: by default none beyond the basics).
		Devices: append([]specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}}, defaultDevices...),
	}
	for _, d := range o.Devices {
		rule := specs.LinuxDeviceCgroup{Allow: true, Type: d.Type, Access: d.Access}
		if d.Major >= 0 {
			rule.Major = i64(d.Major)
		}
		if d.Minor >= 0 {
			rule.Minor = i64(d.Minor)
		}
		r.Devices = append(r.Devices, rule)
	}
	if o.PidsLimit > 0 {
		r.Pids = &specs.LinuxPids{Limit: o.PidsLimit}
	}
	if o.MemoryBytes > 0 {
		r.Memory = &specs.LinuxMemory{Limit: i64(o.MemoryBytes)}
		if o.NoSwap {
			r.Memory.Swap = i64(o.MemoryBytes)
		}
	}
	if o.CPUs != "" || o.CPUWeight > 0 || o.CPUQuotaPct > 0 {
		r.CPU = &specs.LinuxCPU{Cpus: o.CPUs}
		if o.CPUWeight > 0 {
			// runc takes v1 shares and converts them on cgroup v2; map the
			// v2 weight scale 1..10000 (default 100) to shares (default 1024).
			shares := uint64(o.CPUWeight) * 1024 / 100
			if shares < 2 {
				shares = 2
			}
			r.CPU.Shares = &shares
		}
		if o.CPUQuotaPct > 0 {
			period := uint64(100000)
			quota := int64(o.CPUQuotaPct) * 1000
			r.CPU.Period = &period
			r.CPU.Quota = &quota
		}
	}
	return r
}

// WriteBundle writes config.json for s into dir (0600; the bundle holds no
// secrets today, but environment values may become some). The bundle lives
// in the per-boot run directory, so it is not synced: a power loss takes
// the containers with it.
func WriteBundle(dir string, s *specs.Spec) error {
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		return fmt.Errorf("write bundle: %w", err)
	}
	return nil
}
