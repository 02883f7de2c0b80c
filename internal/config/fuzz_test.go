package config

import (
	"strings"
	"testing"
)

// Fuzz targets for every config format cmld takes from outside. A parser
// may refuse anything; it must never panic, and what it accepts must
// validate and render back to a config that parses again.

func FuzzParseContainer(f *testing.F) {
	f.Add([]byte("name: \"web\"\nguest_os: \"busybox\"\nram_limit: 64\nallow_dev: \"c 4:1 rwm\"\nvolumes { name: \"d\" mount_point: \"/data\" }\n"))
	f.Add([]byte("name: \"x\"\nguest_os: \"busybox\"\nnet_ifaces { netif: \"eth0\" }\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseContainer("fuzz.conf", b)
		if err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
			return
		}
		if err := ValidateContainer("fuzz.conf", c); err != nil {
			t.Errorf("parsed config does not validate: %v", err)
		}
	})
}

func FuzzParseGuestOS(f *testing.F) {
	f.Add([]byte("name: \"busybox\"\nversion: 1\ninit_path: \"/sbin/init\"\nmounts { image_file: \"root.img\" mount_point: \"/\" fs_type: \"erofs\" image_size: 4096 image_sha2_256: \"" + strings.Repeat("a", 64) + "\" verity_root_hash: \"" + strings.Repeat("b", 64) + "\" verity_salt: \"00\" }\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := ParseGuestOS("guestos.conf", b); err != nil && strings.Contains(err.Error(), "\n") {
			t.Errorf("error is not one line: %q", err)
		}
	})
}

func FuzzParseDevice(f *testing.F) {
	f.Add([]byte("version: 1\nsigned_configs: true\nmeasurement_pcr: 11\nstorage {}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := ParseDevice("device.conf", b); err != nil && strings.Contains(err.Error(), "\n") {
			t.Errorf("error is not one line: %q", err)
		}
	})
}

func FuzzParseDeviceRule(f *testing.F) {
	f.Add("c 4:1 rwm")
	f.Add("b 8:* r")
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDeviceRule(s)
		if err != nil {
			return
		}
		if d.Type != "c" && d.Type != "b" {
			t.Errorf("%q parsed to type %q", s, d.Type)
		}
	})
}
