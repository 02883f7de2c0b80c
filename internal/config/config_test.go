package config

import (
	"errors"
	"strings"
	"testing"

	"github.com/cmlproject/cml/internal/errdefs"
)

func TestParseContainerErrors(t *testing.T) {
	cases := []struct{ name, text, want string }{
		{"bad value", "name: \"x\"\nguest_os: \"g\"\nram_limit: \"lots\"\n", "c.conf:3:12: invalid value"},
		{"unknown field", "name: \"x\"\nfoo: 1\n", "c.conf:2:1: unknown field: foo"},
		{"bad enum", "name: \"x\"\ntype: DOCKER\n", "c.conf:2:7"},
		{"missing name", "guest_os: \"g\"\n", "field name: is required"},
		{"bad name", "name: \"../x\"\nguest_os: \"g\"\n", "c.conf:1: field name"},
		{"long name", "name: \"" + strings.Repeat("a", 65) + "\"\nguest_os: \"g\"\n", "field name"},
		{"ram range", "name: \"x\"\nguest_os: \"g\"\nram_limit: 4\n", "c.conf:3: field ram_limit"},
		{"cpus", "name: \"x\"\nguest_os: \"g\"\nassign_cpus: \"3-1\"\n", "reversed"},
		{"env", "name: \"x\"\nguest_os: \"g\"\ninit_env: \"NOEQUALS\"\n", "not KEY=value"},
		{"dev", "name: \"x\"\nguest_os: \"g\"\nassign_dev: \"c *:1 rw\"\n", "fixed major:minor"},
		{"volume escape", "name: \"x\"\nguest_os: \"g\"\nvolumes { name: \"v\" mount_point: \"/a/../proc\" }\n", "not a clean path"},
		{"oversized", strings.Repeat("#", MaxFileSize+1), "larger than"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseContainer("c.conf", []byte(tc.text))
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("error class: %v", err)
			}
			if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q does not contain %q on one line", err, tc.want)
			}
		})
	}
}

// TestGyroidOSConfigLoads: a config in GyroidOS's field names and numbers
// loads unchanged.
func TestGyroidOSConfigLoads(t *testing.T) {
	text := `name: "core0"
guest_os: "trustx-coreos"
guestos_version: 1
ram_limit: 1024
color: 0x00ff00
type: CONTAINER
init_env: "PATH=/bin"
userns: true
assign_cpus: "0-1"
allow_autostart: true
netns: true
allow_dev: "c 4:1 rwm"
assign_dev: "c 188:0 rwm"
token_type: NONE
`
	c, err := ParseContainer("core0.conf", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if c.GetName() != "core0" || c.GetRamLimit() != 1024 || !c.GetUserns() || c.GetAssignDev()[0] != "c 188:0 rwm" {
		t.Errorf("parsed %v", c)
	}
}

func TestDefaults(t *testing.T) {
	c, err := ParseContainer("c.conf", []byte("name: \"x\"\nguest_os: \"g\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !c.GetUserns() || !c.GetNetns() || c.GetSeccompProfile() != "default" {
		t.Errorf("defaults: userns %v netns %v seccomp %q", c.GetUserns(), c.GetNetns(), c.GetSeccompProfile())
	}
}

func TestParseGuestOSRefusesEscapes(t *testing.T) {
	base := "name: \"g\"\nversion: 1\nmounts { image_file: %q mount_point: \"/\" fs_type: \"erofs\" image_size: 1 image_sha2_256: \"" + strings.Repeat("a", 64) + "\" }\n"
	for _, f := range []string{"../root.img", "/etc/passwd", "a/b", ".."} {
		text := strings.Replace(base, "%q", `"`+f+`"`, 1)
		if _, err := ParseGuestOS("m.conf", []byte(text)); err == nil || !strings.Contains(err.Error(), "image_file") {
			t.Errorf("image_file %q: err = %v", f, err)
		}
	}
}

// TestParseDevice refuses device settings that would measure into a PCR
// that does not exist or put control characters into the device
// certificate's name.
func TestParseDevice(t *testing.T) {
	d, err := ParseDevice("device.conf", []byte("product_name: \"Gateway\"\nserial: \"A-17\"\nmeasurement_pcr: 13\n"))
	if err != nil || d.GetMeasurementPcr() != 13 || d.GetProductName() != "Gateway" {
		t.Fatalf("%v %v", d, err)
	}
	if d, _ := ParseDevice("device.conf", nil); d.GetMeasurementPcr() != 11 || d.GetProductName() != "CML device" {
		t.Errorf("defaults: %v", d)
	}
	if _, err := ParseDevice("device.conf", []byte("version: 1\nstorage {}\nnetwork {}\naudit {}\nremote {}\naccess { limited_root_trust: true }\n")); err != nil {
		t.Errorf("version 1 with its sections: %v", err)
	}
	for _, bad := range []string{"measurement_pcr: 24\n", "serial: \"a\\nb\"\n", "product_name: \"" + strings.Repeat("x", 65) + "\"\n",
		"version: 2\n", "storage { token: \"x\" }\n", "uplink: \"eth0\"\n",
		"remote { listen: \":7443\" max_connections: 4 max_connections_per_host: 5 }\n", "remote { listen: \":7443\" max_connections_per_host: 0 }\n",
		"access { limited_root_trust: 1 root: true }\n"} {
		if _, err := ParseDevice("device.conf", []byte(bad)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

func TestValidSalt(t *testing.T) {
	for s, want := range map[string]bool{
		"": true, "00": true, strings.Repeat("ab", 256): true, "0123456789abcdef": true,
		"0": false, "AB": false, "zz": false, strings.Repeat("ab", 257): false, "ab\n": false,
	} {
		if got := validSalt(s); got != want {
			t.Errorf("validSalt(%q) = %t", s, got)
		}
	}
}
