package config

import (
	"regexp"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
)

// MaxImageSize bounds one guest OS image (16 GiB).
const MaxImageSize = 16 << 30

// MaxMounts bounds the images of one guest OS.
const MaxMounts = 16

var (
	sha256Pattern = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// ParseGuestOS parses and validates a guest OS manifest. Image file names
// are plain names inside the guest OS directory: a name that could escape
// it is refused here, before any path is built from it.
func ParseGuestOS(source string, text []byte) (*cmlv1.GuestOSConfig, error) {
	g := &cmlv1.GuestOSConfig{}
	if err := parseText(source, text, g); err != nil {
		return nil, err
	}
	v := &validator{source: source, text: text}
	switch {
	case g.Name == nil:
		v.fail("name", "is required")
	case !ValidName(g.GetName()):
		v.fail("name", "%q is not a safe identifier", g.GetName())
	}
	if g.GetVersion() == 0 {
		v.fail("version", "is required and must be at least 1")
	}
	if len(g.GetMounts()) == 0 {
		v.fail("mounts", "at least one image (the root filesystem, mount_point \"/\") is required")
	}
	if len(g.GetMounts()) > MaxMounts {
		v.fail("mounts", "more than %d images", MaxMounts)
	}
	roots := 0
	files := map[string]bool{}
	for _, m := range g.GetMounts() {
		switch {
		case !ValidName(m.GetImageFile()):
			v.fail("image_file", "%q is not a plain file name inside the guest OS directory", m.GetImageFile())
		case files[m.GetImageFile()]:
			v.fail("image_file", "%q is listed twice", m.GetImageFile())
		}
		files[m.GetImageFile()] = true
		if m.GetMountPoint() == "/" {
			roots++
		} else if err := validMountPoint(m.GetMountPoint()); err != nil {
			v.fail("mount_point", "%v", err)
		}
		if fs := m.GetFsType(); fs != "erofs" && fs != "squashfs" {
			v.fail("fs_type", "%q is not a supported image type (erofs, squashfs)", fs)
		}
		if s := m.GetImageSize(); s == 0 || s > MaxImageSize {
			v.fail("image_size", "%d is out of range (1..%d)", s, uint64(MaxImageSize))
		}
		if !sha256Pattern.MatchString(m.GetImageSha2_256()) {
			v.fail("image_sha2_256", "%q is not a lower-case hex SHA-256", m.GetImageSha2_256())
		}
		if m.VerityRootHash != nil {
			if !sha256Pattern.MatchString(m.GetVerityRootHash()) {
				v.fail("verity_root_hash", "%q is not a lower-case hex SHA-256", m.GetVerityRootHash())
			}
			if !validSalt(m.GetVeritySalt()) {
				v.fail("verity_salt", "%q is not lower-case hex of at most 256 bytes", m.GetVeritySalt())
			}
			if m.GetImageSize()%4096 != 0 {
				v.fail("image_size", "%d is not a multiple of the 4096-byte verity block", m.GetImageSize())
			}
		}
	}
	if len(g.GetMounts()) > 0 && roots != 1 {
		v.fail("mount_point", "exactly one image must have mount_point \"/\" (found %d)", roots)
	}
	if p := g.GetInitPath(); p == "" || p[0] != '/' {
		v.fail("init_path", "%q is not an absolute path", p)
	}
	for _, e := range g.GetInitEnv() {
		if !envPattern.MatchString(e) {
			v.fail("init_env", "%q is not KEY=value", e)
		}
	}
	if r := g.GetMinRamLimit(); r > MaxRAMLimitMiB {
		v.fail("min_ram_limit", "%d MiB is out of range", r)
	}
	if err := v.err(); err != nil {
		return nil, err
	}
	return g, nil
}

// validSalt accepts lower-case hex of whole bytes, at most 256 of them.
// (As a regular expression, the bounded repetition compiles into 256
// copies: half a millisecond at every start of every tool.)
func validSalt(s string) bool {
	if len(s)%2 != 0 || len(s) > 512 {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
