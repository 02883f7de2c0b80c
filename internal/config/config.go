// Package config parses and validates CML's configuration files: container
// configs and guest OS manifests, both protobuf text format of the schema in
// api/cml/v1.
//
// Parsing is strict: unknown fields, bad enum values and out-of-range
// numbers are errors naming the file, line and field. Every name that later
// becomes a path is checked against a strict pattern here. This package does
// not check signatures (that is the trust chain's job) nor anything that
// needs the daemon's state (guest OS presence, device exclusivity).
package config

import (
	"errors"
	"fmt"
	"net"
	"path"
	"regexp"
	"strconv"
	"strings"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/errdefs"
)

// MaxFileSize bounds config and manifest files; anything larger is refused
// before parsing.
const MaxFileSize = 64 << 10

// namePattern is what a container, guest OS, volume or image file name may
// look like: it never contains a path separator, never is "." or "..", has
// no control characters and is at most 64 bytes.
var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// ValidName reports whether s is a safe identifier (see namePattern).
func ValidName(s string) bool { return namePattern.MatchString(s) }

// FieldError is a validation error that names the source, line and field.
type FieldError struct {
	Source string
	Line   int
	Field  string
	Msg    string
}

func (e *FieldError) Error() string {
	loc := e.Source
	if loc == "" {
		loc = "config"
	}
	if e.Line > 0 {
		loc += ":" + strconv.Itoa(e.Line)
	}
	return fmt.Sprintf("%s: field %s: %s", loc, e.Field, e.Msg)
}

func (e *FieldError) Is(target error) bool { return target == errdefs.ErrInvalidArgument }

var prototextPos = regexp.MustCompile(`\(line (\d+):(\d+)\): (.*)$`)

// parseText unmarshals text strictly into m and rewrites prototext's error
// into "source:line:col: message".
func parseText(source string, text []byte, m proto.Message) error {
	if len(text) > MaxFileSize {
		return errdefs.InvalidArgument("%s: file is %d bytes, larger than the %d byte limit", source, len(text), MaxFileSize)
	}
	if err := (prototext.UnmarshalOptions{}).Unmarshal(text, m); err != nil {
		// prototext prefixes "proto:" with a non-breaking space and may end
		// with a newline; the user gets one clean line.
		msg := strings.TrimSpace(err.Error())
		msg = strings.TrimSpace(strings.TrimPrefix(strings.TrimPrefix(msg, "proto:"), "\u00a0"))
		msg = strings.ReplaceAll(msg, "\n", " ")
		if sub := prototextPos.FindStringSubmatch(msg); sub != nil {
			return errdefs.InvalidArgument("%s:%s:%s: %s", source, sub[1], sub[2], sub[3])
		}
		return errdefs.InvalidArgument("%s: %s", source, msg)
	}
	return nil
}

// lineOf finds the first line where field is set in text, 0 if none.
func lineOf(text []byte, field string) int {
	re := regexp.MustCompile(`^\s*` + regexp.QuoteMeta(field) + `\s*[:{]`)
	for i, l := range strings.Split(string(text), "\n") {
		if re.MatchString(l) {
			return i + 1
		}
	}
	return 0
}

type validator struct {
	source string
	text   []byte
	errs   []error
}

func (v *validator) fail(field, format string, args ...any) {
	v.errs = append(v.errs, &FieldError{Source: v.source, Line: lineOf(v.text, field), Field: field, Msg: fmt.Sprintf(format, args...)})
}

// err returns the first error: one line for the user, the rest is noise.
func (v *validator) err() error {
	if len(v.errs) == 0 {
		return nil
	}
	return v.errs[0]
}

// ParseContainer parses and validates a container config. source names the
// file in error messages.
func ParseContainer(source string, text []byte) (*cmlv1.ContainerConfig, error) {
	c := &cmlv1.ContainerConfig{}
	if err := parseText(source, text, c); err != nil {
		return nil, err
	}
	if err := validateContainer(source, text, c); err != nil {
		return nil, err
	}
	return c, nil
}

// ValidateContainer validates a config that arrived without text (over the
// API); errors then carry no line numbers.
func ValidateContainer(source string, c *cmlv1.ContainerConfig) error {
	text, _ := prototext.MarshalOptions{Multiline: true}.Marshal(c)
	return validateContainer(source, text, c)
}

// Limits on numeric fields.
const (
	MaxRAMLimitMiB   = 1 << 20 // 1 TiB
	MinRAMLimitMiB   = 8       // below this no guest OS starts
	MaxPidsLimit     = 1 << 22
	MaxCPUWeight     = 10000
	MaxCPUQuotaPct   = 100 * 1024
	MaxStopTimeout   = 3600
	MaxInitEnv       = 256
	MaxDeviceRules   = 64
	MaxVolumes       = 32
	DefaultPidsLimit = 1024
	DefaultStopSecs  = 10
)

var (
	cpusPattern = regexp.MustCompile(`^[0-9]{1,4}(-[0-9]{1,4})?(,[0-9]{1,4}(-[0-9]{1,4})?)*$`)
	envPattern  = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=[^\x00]*$`)
)

// deniedCaps are capabilities that break the container boundary or the
// device's integrity; capabilities_keep may not add them (TSF-ISO, TRS
// "containers accessing host resources"). CAP_SYS_TIME is granted only
// through allow_system_time (IAM-02).
var deniedCaps = map[string]bool{
	// CAP_MKNOD: with it, a container without a user namespace makes a
	// node for any device its cgroup allows and reads the host's disks.
	"CAP_MKNOD":     true,
	"CAP_SYS_ADMIN": true, "CAP_SYS_MODULE": true, "CAP_SYS_RAWIO": true,
	"CAP_SYS_PTRACE": true, "CAP_SYS_BOOT": true, "CAP_MAC_ADMIN": true,
	"CAP_MAC_OVERRIDE": true, "CAP_BPF": true, "CAP_PERFMON": true,
	"CAP_DAC_READ_SEARCH": true, "CAP_SYS_TIME": true, "CAP_SYSLOG": true,
	"CAP_AUDIT_CONTROL": true, "CAP_LINUX_IMMUTABLE": true, "CAP_CHECKPOINT_RESTORE": true,
}

// KnownCaps is the set of capability names the kernel defines.
var KnownCaps = map[string]bool{
	"CAP_CHOWN": true, "CAP_DAC_OVERRIDE": true, "CAP_DAC_READ_SEARCH": true, "CAP_FOWNER": true,
	"CAP_FSETID": true, "CAP_KILL": true, "CAP_SETGID": true, "CAP_SETUID": true, "CAP_SETPCAP": true,
	"CAP_LINUX_IMMUTABLE": true, "CAP_NET_BIND_SERVICE": true, "CAP_NET_BROADCAST": true,
	"CAP_NET_ADMIN": true, "CAP_NET_RAW": true, "CAP_IPC_LOCK": true, "CAP_IPC_OWNER": true,
	"CAP_SYS_MODULE": true, "CAP_SYS_RAWIO": true, "CAP_SYS_CHROOT": true, "CAP_SYS_PTRACE": true,
	"CAP_SYS_PACCT": true, "CAP_SYS_ADMIN": true, "CAP_SYS_BOOT": true, "CAP_SYS_NICE": true,
	"CAP_SYS_RESOURCE": true, "CAP_SYS_TIME": true, "CAP_SYS_TTY_CONFIG": true, "CAP_MKNOD": true,
	"CAP_LEASE": true, "CAP_AUDIT_WRITE": true, "CAP_AUDIT_CONTROL": true, "CAP_SETFCAP": true,
	"CAP_MAC_OVERRIDE": true, "CAP_MAC_ADMIN": true, "CAP_SYSLOG": true, "CAP_WAKE_ALARM": true,
	"CAP_BLOCK_SUSPEND": true, "CAP_AUDIT_READ": true, "CAP_PERFMON": true, "CAP_BPF": true,
	"CAP_CHECKPOINT_RESTORE": true,
}

func validateContainer(source string, text []byte, c *cmlv1.ContainerConfig) error {
	v := &validator{source: source, text: text}
	switch {
	case c.Name == nil:
		v.fail("name", "is required")
	case !ValidName(c.GetName()):
		v.fail("name", "%q is not a safe identifier (letters, digits, '_', '.', '-'; starts with a letter or digit; at most 64 bytes)", c.GetName())
	}
	switch {
	case c.GuestOs == nil:
		v.fail("guest_os", "is required")
	case !ValidName(c.GetGuestOs()):
		v.fail("guest_os", "%q is not a safe identifier", c.GetGuestOs())
	}
	if c.GetType() != cmlv1.ContainerType_CONTAINER {
		v.fail("type", "%s containers are not supported by this daemon", c.GetType())
	}
	if r := c.GetRamLimit(); r != 0 && (r < MinRAMLimitMiB || r > MaxRAMLimitMiB) {
		v.fail("ram_limit", "%d MiB is out of range (0 = unlimited, or %d..%d)", r, MinRAMLimitMiB, MaxRAMLimitMiB)
	}
	if len(c.GetInitEnv()) > MaxInitEnv {
		v.fail("init_env", "more than %d entries", MaxInitEnv)
	}
	for _, e := range c.GetInitEnv() {
		if !envPattern.MatchString(e) {
			v.fail("init_env", "%q is not KEY=value", e)
		}
	}
	if s := c.GetAssignCpus(); s != "" {
		if err := validCPUs(s); err != nil {
			v.fail("assign_cpus", "%v", err)
		}
	}
	validateNetwork(v, c)
	if len(c.GetAllowDev())+len(c.GetAssignDev()) > MaxDeviceRules {
		v.fail("allow_dev", "more than %d device rules", MaxDeviceRules)
	}
	for _, r := range c.GetAllowDev() {
		if d, err := ParseDeviceRule(r); err != nil {
			v.fail("allow_dev", "%v", err)
		} else if d.Major < 0 {
			// "c *:*" opens every device of a kind to the container: the
			// host's disks, memory, loop devices (CR 7.7, TSF-DEV).
			v.fail("allow_dev", "%q: a wildcard major number would allow every %s device of the host; name the major", r, kind(d.Type))
		}
	}
	for _, r := range c.GetAssignDev() {
		d, err := ParseDeviceRule(r)
		if err != nil {
			v.fail("assign_dev", "%v", err)
		} else if d.Major < 0 || d.Minor < 0 {
			v.fail("assign_dev", "%q: an exclusively assigned device needs a fixed major:minor, not '*'", r)
		}
	}
	if p := c.GetPidsLimit(); p > MaxPidsLimit {
		v.fail("pids_limit", "%d is out of range (0..%d)", p, MaxPidsLimit)
	}
	if w := c.GetCpuWeight(); w > MaxCPUWeight {
		v.fail("cpu_weight", "%d is out of range (0 = default, 1..%d)", w, MaxCPUWeight)
	}
	if q := c.GetCpuQuotaPercent(); q > MaxCPUQuotaPct {
		v.fail("cpu_quota_percent", "%d is out of range (0 = unlimited, 1..%d)", q, MaxCPUQuotaPct)
	}
	for _, cp := range c.GetCapabilitiesKeep() {
		switch {
		case !KnownCaps[cp]:
			v.fail("capabilities_keep", "%q is not a capability name (e.g. CAP_NET_RAW)", cp)
		case deniedCaps[cp]:
			v.fail("capabilities_keep", "%s would break container isolation and cannot be kept", cp)
		}
	}
	if p := c.GetSeccompProfile(); p != "default" && p != "unconfined" {
		v.fail("seccomp_profile", "%q is not a profile (default, unconfined)", p)
	}
	if t := c.GetStopTimeout(); t > MaxStopTimeout {
		v.fail("stop_timeout", "%d s is out of range (0 = default %d, up to %d)", t, DefaultStopSecs, MaxStopTimeout)
	}
	if len(c.GetVolumes()) > MaxVolumes {
		v.fail("volumes", "more than %d volumes", MaxVolumes)
	}
	seen := map[string]bool{}
	for _, vol := range c.GetVolumes() {
		switch {
		case !ValidName(vol.GetName()):
			v.fail("volumes", "name %q is not a safe identifier", vol.GetName())
		case seen[vol.GetName()]:
			v.fail("volumes", "name %q is used twice", vol.GetName())
		}
		seen[vol.GetName()] = true
		if err := validMountPoint(vol.GetMountPoint()); err != nil {
			v.fail("volumes", "volume %q: %v", vol.GetName(), err)
		}
	}
	return v.err()
}

func validMountPoint(p string) error {
	switch {
	case p == "" || !path.IsAbs(p):
		return fmt.Errorf("mount_point %q is not an absolute path", p)
	case path.Clean(p) != p || strings.ContainsAny(p, "\x00\n"):
		return fmt.Errorf("mount_point %q is not a clean path", p)
	case p == "/":
		return errors.New("mount_point may not be /")
	}
	for _, reserved := range []string{"/proc", "/sys", "/dev"} {
		if p == reserved || strings.HasPrefix(p, reserved+"/") {
			return fmt.Errorf("mount_point %q is under %s, which the daemon manages", p, reserved)
		}
	}
	return nil
}

func validCPUs(s string) error {
	if !cpusPattern.MatchString(s) {
		return fmt.Errorf("%q is not a CPU list such as \"0-1\" or \"0,2\"", s)
	}
	for _, part := range strings.Split(s, ",") {
		lo, hi, found := strings.Cut(part, "-")
		if found {
			a, _ := strconv.Atoi(lo)
			b, _ := strconv.Atoi(hi)
			if a > b {
				return fmt.Errorf("%q: range %s is reversed", s, part)
			}
		}
	}
	return nil
}

// DeviceRule is a parsed device cgroup rule ("c 4:1 rwm"); -1 is '*'.
type DeviceRule struct {
	Type   string // "c" or "b"
	Major  int64
	Minor  int64
	Access string
}

// String formats the rule as written in configs.
func (d DeviceRule) String() string {
	f := func(n int64) string {
		if n < 0 {
			return "*"
		}
		return strconv.FormatInt(n, 10)
	}
	return fmt.Sprintf("%s %s:%s %s", d.Type, f(d.Major), f(d.Minor), d.Access)
}

func kind(t string) string {
	if t == "b" {
		return "block"
	}
	return "character"
}

var devRulePattern = regexp.MustCompile(`^([cb]) (\*|[0-9]{1,7}):(\*|[0-9]{1,9}) ([rwm]{1,3})$`)

// ParseDeviceRule parses "c 4:1 rwm". The "a" (all devices) type is refused:
// a container is given devices one rule at a time (CR 7.7).
func ParseDeviceRule(s string) (DeviceRule, error) {
	m := devRulePattern.FindStringSubmatch(s)
	if m == nil {
		return DeviceRule{}, fmt.Errorf("%q is not a device rule such as \"c 4:1 rwm\" (types c or b)", s)
	}
	num := func(x string) int64 {
		if x == "*" {
			return -1
		}
		n, _ := strconv.ParseInt(x, 10, 64)
		return n
	}
	acc := m[4]
	for _, ch := range "rwm" {
		if strings.Count(acc, string(ch)) > 1 {
			return DeviceRule{}, fmt.Errorf("%q: access %q repeats a letter", s, acc)
		}
	}
	return DeviceRule{Type: m[1], Major: num(m[2]), Minor: num(m[3]), Access: acc}, nil
}

// DeviceConfigVersion is the device.conf schema this cmld reads.
const DeviceConfigVersion = 1

// ParseDevice parses the device settings file (device.conf).
func ParseDevice(source string, text []byte) (*cmlv1.DeviceConfig, error) {
	d := &cmlv1.DeviceConfig{}
	if err := parseText(source, text, d); err != nil {
		return nil, err
	}
	if v := d.GetVersion(); v > DeviceConfigVersion {
		return nil, errdefs.InvalidArgument("%s: field version: %d is newer than this cmld understands (%d)", source, v, DeviceConfigVersion)
	}
	if p := d.GetUpdateCaFile(); p != "" && p[0] != '/' {
		return nil, errdefs.InvalidArgument("%s: field update_ca_file: %q is not an absolute path", source, p)
	}
	if p := d.GetMeasurementPcr(); p > 23 {
		return nil, errdefs.InvalidArgument("%s: field measurement_pcr: PCR %d does not exist (0 to 23)", source, p)
	}
	for field, v := range map[string]string{"product_name": d.GetProductName(), "serial": d.GetSerial()} {
		if len(v) > 64 || strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			return nil, errdefs.InvalidArgument("%s: field %s: at most 64 printable characters", source, field)
		}
	}
	if err := ValidateNetworkSettings(source, d.GetNetwork()); err != nil {
		return nil, err
	}
	if r := d.GetRemote(); r.GetListen() != "" {
		if _, port, err := net.SplitHostPort(r.GetListen()); err != nil || port == "" {
			return nil, errdefs.InvalidArgument("%s: field remote.listen: %q is not host:port", source, r.GetListen())
		}
		if n := r.GetMaxConnections(); n == 0 || n > 4096 {
			return nil, errdefs.InvalidArgument("%s: field remote.max_connections: %d is out of range (1..4096)", source, n)
		}
		if n := r.GetMaxConnectionsPerHost(); n == 0 || n > r.GetMaxConnections() {
			return nil, errdefs.InvalidArgument("%s: field remote.max_connections_per_host: %d is out of range (1..max_connections)", source, n)
		}
	}
	if a := d.GetAudit(); a != nil {
		if n := a.GetCheckpointEvery(); n == 0 || n > 1000000 {
			return nil, errdefs.InvalidArgument("%s: field audit.checkpoint_every: %d is out of range (1..1000000)", source, n)
		}
		if w, h := a.GetWarnPercent(), a.GetWarnPercentHigh(); w == 0 || w >= h || h >= 100 {
			return nil, errdefs.InvalidArgument("%s: fields audit.warn_percent and warn_percent_high: %d and %d must rise within 1..99", source, w, h)
		}
		if a.GetWhenFull() == cmlv1.AuditSettings_ROTATE && a.GetCollector() == "" {
			return nil, errdefs.InvalidArgument("%s: field audit.when_full: ROTATE drops only what a collector holds; set audit.collector", source)
		}
		if col := a.GetCollector(); col != "" {
			if _, port, err := net.SplitHostPort(col); err != nil || port == "" {
				return nil, errdefs.InvalidArgument("%s: field audit.collector: %q is not host:port", source, col)
			}
			if p := a.GetCollectorCaFile(); p == "" || p[0] != '/' {
				return nil, errdefs.InvalidArgument("%s: field audit.collector_ca_file: an absolute path to the CAs the collector's certificate must chain to is required with a collector", source)
			}
		}
		if n := a.GetCheckpointIntervalSeconds(); n == 0 || n > 86400 {
			return nil, errdefs.InvalidArgument("%s: field audit.checkpoint_interval_seconds: %d is out of range (1..86400)", source, n)
		}
	}
	if st := d.GetStorage(); st != nil {
		if p := st.GetPkcs11Module(); p != "" && p[0] != '/' {
			return nil, errdefs.InvalidArgument("%s: field storage.pkcs11_module: %q is not an absolute path", source, p)
		}
		if n := st.GetMaxPinAttempts(); n == 0 || n > 100 {
			return nil, errdefs.InvalidArgument("%s: field storage.max_pin_attempts: %d is out of range (1..100)", source, n)
		}
		if n := st.GetVolumeSizeMib(); n < 64 || n > 1<<20 {
			return nil, errdefs.InvalidArgument("%s: field storage.volume_size_mib: %d is out of range (64..1048576)", source, n)
		}
		for _, p := range st.GetTpmPcrs() {
			if p > 23 {
				return nil, errdefs.InvalidArgument("%s: field storage.tpm_pcrs: PCR %d does not exist (0 to 23)", source, p)
			}
		}
	}
	return d, nil
}
