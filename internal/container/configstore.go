package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/sign"
)

// A container's stored config is one unit: the exact config bytes, their
// signature and signer chain, and the record of its acceptance, in a
// version directory config.<n>. The link "config" names the current one.
// An update writes config.<n+1> completely, every file synced, and then
// switches the link with one rename: a failure or crash at any point
// leaves the old config or the new one whole, never a new config with the
// old signature.
const (
	configLink   = "config"
	configFile   = "config.conf"
	acceptFile   = "accept.json"
	configPrefix = "config."
)

// acceptance is when and how a config was accepted.
type acceptance struct {
	Accepted time.Time        `json:"accepted"`
	Trust    cmlv1.TrustLevel `json:"trust"`
	Signer   string           `json:"signer,omitempty"`
}

// configFault, when set (tests), fails the config write at the named step.
var configFault func(step string) error

func fault(step string) error {
	if configFault != nil {
		return configFault(step)
	}
	return nil
}

// storedConfigDir is the directory holding the current config files of
// the container in dir: the version the link names, or dir itself for a
// container stored before versioned configs.
func storedConfigDir(dir string) string {
	if target, err := os.Readlink(filepath.Join(dir, configLink)); err == nil && !strings.Contains(target, "/") {
		return filepath.Join(dir, target)
	}
	return dir
}

// readAcceptance reads the acceptance record next to the current config;
// legacy containers kept it in meta.json.
func readAcceptance(dir string, legacy meta) (acceptance, error) {
	b, err := os.ReadFile(filepath.Join(storedConfigDir(dir), acceptFile))
	if errors.Is(err, os.ErrNotExist) {
		return acceptance{Accepted: legacy.Accepted, Trust: legacy.Trust, Signer: legacy.Signer}, nil
	}
	if err != nil {
		return acceptance{}, err
	}
	var a acceptance
	if err := json.Unmarshal(b, &a); err != nil {
		return acceptance{}, fmt.Errorf("%s: %w", acceptFile, err)
	}
	return a, nil
}

// writeConfig stores f with its acceptance as the container's new config
// version and makes it current.
func writeConfig(dir string, f ConfigFile, acc acceptance) (err error) {
	next := 1
	if target, err := os.Readlink(filepath.Join(dir, configLink)); err == nil {
		if n, err := strconv.Atoi(strings.TrimPrefix(target, configPrefix)); err == nil {
			next = n + 1
		}
	}
	name := configPrefix + strconv.Itoa(next)
	vdir := filepath.Join(dir, name)
	os.RemoveAll(vdir) // a leftover of an update that failed before its switch
	if err := fault("mkdir"); err != nil {
		return err
	}
	if err := os.Mkdir(vdir, 0o700); err != nil {
		return err
	}
	committed := false
	defer func() {
		if !committed {
			os.RemoveAll(vdir)
		}
	}()
	ab, _ := json.Marshal(acc)
	for _, file := range []struct {
		name string
		b    []byte
	}{{configFile, f.Text}, {configFile + sign.SigSuffix, f.Sig}, {configFile + sign.CertSuffix, f.Pem}, {acceptFile, ab}} {
		if len(file.b) == 0 && file.name != configFile {
			continue
		}
		if err := fault("write " + file.name); err != nil {
			return err
		}
		if err := atomicfile.Write(filepath.Join(vdir, file.name), file.b, 0o600); err != nil {
			return err
		}
	}
	tmpLink := filepath.Join(dir, ".config-link-"+strconv.Itoa(next))
	os.Remove(tmpLink)
	if err := fault("link"); err != nil {
		return err
	}
	if err := os.Symlink(name, tmpLink); err != nil {
		return err
	}
	if err := fault("switch"); err != nil {
		os.Remove(tmpLink)
		return err
	}
	if err := os.Rename(tmpLink, filepath.Join(dir, configLink)); err != nil {
		os.Remove(tmpLink)
		return err
	}
	committed = true
	atomicfile.SyncDir(dir)
	// Older versions (and a legacy top-level config) are no longer read.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.Name() != name && strings.HasPrefix(e.Name(), configPrefix) {
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
	for _, legacy := range []string{configFile, configFile + sign.SigSuffix, configFile + sign.CertSuffix} {
		os.Remove(filepath.Join(dir, legacy))
	}
	return nil
}
