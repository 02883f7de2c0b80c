package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// TestConfigFile: the file sets defaults below the environment and the
// flags; paths are relative to it; a misspelt setting is refused.
func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "cmlctl.conf")
	os.WriteFile(conf, []byte("# comment\nremote = dev:7443\ncert = alice.pem\nkey-label = \"op key\"\nca = /abs/ca.pem\n"), 0o600)
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	var remote, cert, label, ca string
	fs.StringVar(&remote, "remote", "", "")
	fs.StringVar(&cert, "cert", os.Getenv("CML_CERT"), "")
	fs.StringVar(&label, "key-label", "", "")
	fs.StringVar(&ca, "ca", "", "")
	t.Setenv("CML_CERT", "from-env.pem")
	cert = "from-env.pem"
	if err := loadConfig(fs, conf, true); err != nil {
		t.Fatal(err)
	}
	if remote != "dev:7443" || label != "op key" || ca != "/abs/ca.pem" || cert != "from-env.pem" {
		t.Errorf("remote %q label %q ca %q cert %q", remote, label, ca, cert)
	}
	fs.Parse([]string{"--remote", "flag:1"})
	if remote != "flag:1" {
		t.Errorf("the flag did not win: %q", remote)
	}
	t.Setenv("CML_CERT", "")
	loadConfig(fs, conf, true)
	if cert != filepath.Join(dir, "alice.pem") {
		t.Errorf("relative path: %q", cert)
	}
	os.WriteFile(conf, []byte("pin = 1234\n"), 0o600)
	if err := loadConfig(fs, conf, true); err == nil || !strings.Contains(err.Error(), `"pin" is not a setting`) {
		t.Errorf("an unknown setting: %v", err)
	}
	if err := loadConfig(fs, filepath.Join(dir, "none"), false); err != nil {
		t.Errorf("a missing default file: %v", err)
	}
	if err := loadConfig(fs, filepath.Join(dir, "none"), true); err == nil {
		t.Error("a missing --config file was accepted")
	}
	// A default file that is not readable (another user's home, as
	// under sudo) is no file.
	if os.Geteuid() != 0 {
		locked := filepath.Join(dir, "locked.conf")
		os.WriteFile(locked, []byte("remote = x:1\n"), 0o000)
		if err := loadConfig(fs, locked, false); err != nil {
			t.Errorf("an unreadable default file: %v", err)
		}
	}
}
