package cli

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/pflag"

	"github.com/cmlproject/cml/internal/safefile"
)

// configSettings are what cmlctl's config file may set: the connection
// flags, by flag name, with the environment variable that overrides the
// file (and is overridden by the flag). Paths are relative to the file.
var configSettings = map[string]struct {
	env  string
	path bool
}{
	"socket": {"CML_SOCKET", true}, "remote": {"CML_REMOTE", false}, "cert": {"CML_CERT", true}, "key": {"CML_KEY", true},
	"ca": {"CML_CA", true}, "pkcs11-module": {"CML_PKCS11_MODULE", true}, "token-label": {"CML_TOKEN_LABEL", false},
	"key-label": {"CML_KEY_LABEL", false}, "pkcs11-pin-file": {"", true}, "session-file": {"CML_SESSION_FILE", true},
}

// configPath is --config FILE (looked for in args before parsing),
// $CML_CONFIG, or $XDG_CONFIG_HOME/cml/cmlctl.conf; explicit says
// whether it must exist.
func configPath(args []string) (path string, explicit bool) {
	for i, a := range args {
		if a == "--" {
			break
		}
		if v, ok := strings.CutPrefix(a, "--config="); ok {
			return v, true
		}
		if a == "--config" && i+1 < len(args) {
			return args[i+1], true
		}
	}
	if p := os.Getenv("CML_CONFIG"); p != "" {
		return p, true
	}
	if dir, err := os.UserConfigDir(); err == nil {
		return filepath.Join(dir, "cml", "cmlctl.conf"), false
	}
	return "", false
}

// loadConfig applies the config file's settings (`name = value` lines,
// # comments) as defaults below the environment and the flags. It holds
// where to connect and with which files, never a secret.
func loadConfig(fs *pflag.FlagSet, path string, explicit bool) error {
	if path == "" {
		return nil
	}
	b, err := safefile.ReadFile(path, 64<<10)
	if err != nil {
		// The default file is the caller's own: one that is not there,
		// or not readable (another user's home under sudo), is none.
		if !explicit && (errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrPermission)) {
			return nil
		}
		return fmt.Errorf("config %s: %w", path, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, value, ok := strings.Cut(line, "=")
		name, value = strings.TrimSpace(name), strings.Trim(strings.TrimSpace(value), `"`)
		s, known := configSettings[name]
		if !ok || !known {
			return fmt.Errorf("config %s line %d: %q is not a setting (name = value; settings: socket, remote, cert, key, ca, pkcs11-module, token-label, key-label, pkcs11-pin-file, session-file)", path, n, name)
		}
		if s.env != "" && os.Getenv(s.env) != "" {
			continue // the environment wins over the file
		}
		if s.path && value != "" && !filepath.IsAbs(value) {
			value = filepath.Join(filepath.Dir(path), value)
		}
		if err := fs.Set(name, value); err != nil {
			return fmt.Errorf("config %s line %d: %v", path, n, err)
		}
	}
	return nil
}
