package container

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/sign"
	"github.com/cmlproject/cml/internal/trust"
)

// ConfigFile is a container config as it arrived: its exact bytes, and its
// detached signature and signer chain when signed.
type ConfigFile struct {
	Source         string
	Text, Sig, Pem []byte
}

// Acceptor decides whether a container config may be used: signed by a
// trusted chain, or unsigned where the device allows it (device setting
// signed_configs). The manager uses it for create and update, the verify
// stage again before every start.
type Acceptor struct {
	Trust  *trust.Store
	Signed bool
}

// Accept parses a config file and checks its signature: SIGNED or
// LOCALLY_SIGNED by a trusted chain, or UNSIGNED where the device allows
// unsigned configs. at is the time the signer must be valid.
func (a Acceptor) Accept(f ConfigFile, at time.Time) (*cmlv1.ContainerConfig, trust.Result, error) {
	if len(f.Text) > config.MaxFileSize {
		return nil, trust.Result{}, errdefs.InvalidArgument("%s: larger than %d bytes", f.Source, config.MaxFileSize)
	}
	var res trust.Result
	switch {
	case len(f.Sig) == 0 && len(f.Pem) == 0:
		if a.Signed {
			return nil, res, errdefs.Integrity("%s: config is not signed and this device requires signed configs (device setting signed_configs)", f.Source)
		}
		res.Level = cmlv1.TrustLevel_UNSIGNED
	case a.Trust == nil:
		return nil, res, errdefs.FailedPrecondition("%s: no trust store to check the signature", f.Source)
	default:
		var err error
		if res, err = a.Trust.Verify(f.Text, f.Sig, f.Pem, at); err != nil {
			return nil, res, fmt.Errorf("%s: %w", f.Source, err)
		}
	}
	cfg, err := config.ParseContainer(f.Source, f.Text)
	if err != nil {
		return nil, res, err
	}
	return cfg, res, nil
}

// Recheck re-reads the config stored in dir and verifies it again: a
// revoked signer, a removed CA, an edited file or an unsigned config after
// signed_configs was turned on stop the start. It returns the verified
// bytes. accepted is when the config was first accepted, so that only
// revocation, not expiry, stops a config that was valid then.
func (a Acceptor) Recheck(dir, name string, want *cmlv1.ContainerConfig, level cmlv1.TrustLevel, accepted time.Time) ([]byte, error) {
	f, err := StoredConfig(dir, "config of "+name)
	if err != nil {
		return nil, errdefs.Integrity("%v", err)
	}
	cfg, res, err := a.Accept(f, accepted)
	if err != nil {
		return nil, err
	}
	if !proto.Equal(cfg, want) || res.Level != level {
		return nil, errdefs.Integrity("%s: stored config changed since it was accepted", f.Source)
	}
	return f.Text, nil
}

// StoredConfig reads the config stored for the container in dir as it
// was accepted: its exact bytes, signature and signer chain (what a
// backup holds and Create takes back).
func StoredConfig(dir, source string) (ConfigFile, error) {
	f := ConfigFile{Source: source}
	var err error
	dir = storedConfigDir(dir)
	if f.Text, err = os.ReadFile(filepath.Join(dir, configFile)); err != nil {
		return ConfigFile{}, fmt.Errorf("%s: %w", source, err)
	}
	f.Sig, _ = os.ReadFile(filepath.Join(dir, configFile+sign.SigSuffix))
	f.Pem, _ = os.ReadFile(filepath.Join(dir, configFile+sign.CertSuffix))
	return f, nil
}
