package api

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"filippo.io/age"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/backup"
	"github.com/cmlproject/cml/internal/container"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/sign"
)

// Backups is what the device needs to make and take back configuration
// backups (CR 7.3, CR 7.4, OS-06; docs/backup.md). Nil: no backups.
type Backups struct {
	// Recipients are the owner's age recipients (device.conf backup).
	Recipients []age.Recipient
	// Signer is the device key (TLS key in the TPM) that signs a backup.
	Signer crypto.Signer
	// DeviceConf is the device.conf the daemon read ("" for none).
	DeviceConf string
}

// backupFiles collects the device's configuration: device.conf, every
// container's config as accepted (bytes, signature, signer chain), the
// owner CAs and CRLs, the accounts with the password policy, and the
// list of installed guest OSes (their images are signed and installed
// again from the update server, not carried in a backup).
func (s *Server) backupFiles() (map[string][]byte, error) {
	files := map[string][]byte{}
	if s.Backups.DeviceConf != "" {
		b, err := os.ReadFile(s.Backups.DeviceConf)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
		if err == nil {
			files["device.conf"] = b
		}
	}
	for _, c := range s.Containers.List() {
		_, name, dir, _, _, err := s.Containers.ContainerDir(c.GetUuid())
		if err != nil {
			continue // removed meanwhile
		}
		f, err := container.StoredConfig(dir, "config of "+name)
		if err != nil {
			return nil, err
		}
		base := "containers/" + name + "/config.conf"
		files[base] = f.Text
		if len(f.Sig) > 0 {
			files[base+".sig"] = f.Sig
		}
		if len(f.Pem) > 0 {
			files[base+".cert"] = f.Pem
		}
	}
	owner, crls := s.Trust.Export()
	for fp, b := range owner {
		files["trust/owner/"+fp+".pem"] = b
	}
	for fp, c := range crls {
		files["trust/crl/"+fp+".pem"] = c[0]
		if len(c[1]) > 0 {
			files["trust/crl/"+fp+".chain.pem"] = c[1]
		}
	}
	if s.Accounts != nil {
		files["access/accounts.json"] = s.Accounts.Export()
	}
	if s.GuestOS != nil {
		gs, err := s.GuestOS.List()
		if err != nil {
			return nil, err
		}
		var list strings.Builder
		for _, g := range gs {
			fmt.Fprintf(&list, "%s %d\n", g.Name(), g.Version())
		}
		files["guestos/installed.txt"] = []byte(list.String())
	}
	return files, nil
}

// Backup streams an encrypted, signed backup of the device's
// configuration to an administrator. The device cannot read it back: it
// is encrypted to the owner's recipients only; a restore sends the
// decrypted tar (Restore).
func (s *Server) Backup(_ *cmlv1.Empty, stream cmlv1.Control_BackupServer) (err error) {
	ctx := stream.Context()
	const method = "/cml.v1.Control/Backup"
	var sum string
	defer func() {
		object := "configuration"
		if sum != "" {
			object += " sha256 " + sum
		}
		if aerr := s.audit(ctx, method, object, err); aerr != nil && err == nil {
			err = aerr
		}
	}()
	if s.Backups == nil || len(s.Backups.Recipients) == 0 {
		return errdefs.FailedPrecondition("no backup recipient configured (device.conf: backup { recipients: \"age1...\" })")
	}
	if s.Backups.Signer == nil || s.Device == nil {
		return errdefs.FailedPrecondition("backups need the device key")
	}
	files, err := s.backupFiles()
	if err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	info := backup.Info{Device: s.Device.UUID(), Created: time.Now().UTC()}
	if a := s.account(ctx); a != nil {
		info.By = a.Name
	}
	var out bytes.Buffer
	if err := backup.Seal(&out, info, files, s.Backups.Signer, s.Device.Info().GetTlsCertificate(), s.Backups.Recipients); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	h := sha256.Sum256(out.Bytes())
	b := out.Bytes()
	for len(b) > 0 {
		n := min(len(b), 1<<20)
		if err := stream.Send(&cmlv1.BackupChunk{Data: b[:n]}); err != nil {
			return err
		}
		b = b[n:]
	}
	sum = hex.EncodeToString(h[:])
	return nil
}

// Restore takes back a decrypted backup: it must be signed by this
// device's key, or by a device whose certificate the CA that issued this
// device's certificate issued (a replacement device of the same owner).
// Owner CAs and CRLs come first (configs are verified against them), then
// accounts this device does not have, then containers: each config is
// accepted as at create, against this device's trust store and settings.
// What exists is left as it is; device.conf and guest OS images are
// reported for the operator. With dry_run nothing changes.
func (s *Server) Restore(stream cmlv1.Control_RestoreServer) (err error) {
	ctx := stream.Context()
	const method = "/cml.v1.Control/Restore"
	object := "backup"
	defer func() {
		if aerr := s.audit(ctx, method, object, err); aerr != nil && err == nil {
			err = aerr
		}
	}()
	var plain []byte
	dry := false
	for first := true; ; first = false {
		c, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		if first {
			dry = c.GetDryRun()
		}
		if len(plain)+len(c.GetData()) > backup.MaxSize {
			return errdefs.InvalidArgument("backup larger than %d bytes", backup.MaxSize)
		}
		plain = append(plain, c.GetData()...)
	}
	b, err := backup.Parse(plain)
	if err != nil {
		return errdefs.Integrity("%v", err)
	}
	object = fmt.Sprintf("backup of device %s made %s", b.Info.Device, b.Info.Created.Format(time.RFC3339))
	if dry {
		object += " (dry run)"
	}
	if err := s.backupSignerTrusted(b); err != nil {
		return err
	}
	rep := &cmlv1.RestoreReport{Device: proto.String(b.Info.Device), CreatedUnix: proto.Int64(b.Info.Created.Unix()), By: proto.String(b.Info.By)}
	add := func(item, outcome, detail string) {
		rep.Items = append(rep.Items, &cmlv1.RestoreItem{Item: proto.String(item), Outcome: proto.String(outcome), Detail: proto.String(detail)})
		if outcome == "restored" {
			s.Audit.Record(ctx, audit.Event{Type: "management", Operation: "backup.restore", Subject: audit.SubjectFrom(ctx), Object: item, Outcome: audit.Success, Reason: "from the " + object})
		}
	}
	names := b.Names()
	s.restoreTrust(b, names, dry, add)
	s.restoreAccounts(b, dry, add)
	s.restoreContainers(ctx, b, names, dry, add)
	if conf, ok := b.Files["device.conf"]; ok {
		mine, _ := os.ReadFile(s.deviceConf())
		if bytes.Equal(conf, mine) {
			add("device.conf", "present", "the same as this device's")
		} else {
			add("device.conf", "manual", "differs from this device's; it is root's file, read at start: compare and apply it by hand")
		}
	}
	if list, ok := b.Files["guestos/installed.txt"]; ok {
		have := map[string]bool{}
		if gs, err := s.GuestOS.List(); err == nil {
			for _, g := range gs {
				have[fmt.Sprintf("%s %d", g.Name(), g.Version())] = true
			}
		}
		for _, l := range strings.Split(strings.TrimSpace(string(list)), "\n") {
			if l == "" {
				continue
			}
			if have[l] {
				add("guest OS "+l, "present", "")
			} else {
				add("guest OS "+l, "manual", "install the signed guest OS (cmlctl guestos install)")
			}
		}
	}
	return stream.SendAndClose(rep)
}

func (s *Server) deviceConf() string {
	if s.Backups == nil {
		return ""
	}
	return s.Backups.DeviceConf
}

// backupSignerTrusted accepts a backup signed by this device's key, or by
// a device certificate that verifies against the certificates above this
// device's own in its chain (the owner's device CA). A device with a
// self-signed certificate takes back only its own backups.
func (s *Server) backupSignerTrusted(b *backup.Backup) error {
	if s.Backups == nil || s.Backups.Signer == nil || s.Device == nil {
		return errdefs.FailedPrecondition("restoring a backup needs the device key")
	}
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if k, ok := s.Backups.Signer.Public().(equaler); ok && k.Equal(b.Chain[0].PublicKey) {
		return nil
	}
	mine, err := sign.ParseCertificates(s.Device.Info().GetTlsCertificate())
	if err != nil || len(mine) < 2 {
		return errdefs.PermissionDenied("the backup was signed by %q, not by this device, and this device has no issuer to check another device's certificate against", b.Chain[0].Subject.String())
	}
	if err := b.SignedUnder(mine[1:]); err != nil {
		return errdefs.PermissionDenied("the backup was signed by %q, which is neither this device nor a device of this device's issuer: %v", b.Chain[0].Subject.String(), err)
	}
	return nil
}

// restoreTrust registers the backup's owner CAs and loads its CRLs.
func (s *Server) restoreTrust(b *backup.Backup, names []string, dry bool, add func(item, outcome, detail string)) {
	have := map[string]bool{}
	for _, ca := range s.Trust.List() {
		have[ca.Fingerprint] = true
	}
	for _, n := range names {
		fp, ok := strings.CutPrefix(n, "trust/owner/")
		if !ok {
			continue
		}
		fp = strings.TrimSuffix(fp, ".pem")
		item := "owner CA " + fp[:min(16, len(fp))]
		switch {
		case have[fp]:
			add(item, "present", "")
		case dry:
			add(item, "would restore", "")
		default:
			if c, err := s.Trust.AddOwnerCA(b.Files[n]); errors.Is(err, errdefs.ErrAlreadyExists) {
				add(item, "present", "") // registered meanwhile
			} else if err != nil {
				add(item, "refused", err.Error())
			} else {
				add(item, "restored", c.Subject)
			}
		}
	}
	for _, n := range names {
		if !strings.HasPrefix(n, "trust/crl/") || strings.HasSuffix(n, ".chain.pem") {
			continue
		}
		fp := strings.TrimSuffix(path.Base(n), ".pem")
		item := "CRL " + fp[:min(16, len(fp))]
		if dry {
			add(item, "would restore", "")
			continue
		}
		if c, err := s.Trust.AddCRL(b.Files[n], b.Files[strings.TrimSuffix(n, ".pem")+".chain.pem"]); err != nil {
			add(item, "refused", err.Error())
		} else {
			add(item, "restored", c.Issuer)
		}
	}
}

// restoreAccounts adds the backup's accounts this device does not have.
func (s *Server) restoreAccounts(b *backup.Backup, dry bool, add func(item, outcome, detail string)) {
	accs, ok := b.Files["access/accounts.json"]
	if !ok || s.Accounts == nil {
		return
	}
	if dry {
		add("accounts", "would restore", "those this device does not have")
		return
	}
	added, skipped, err := s.Accounts.Restore(accs)
	if err != nil {
		add("accounts", "refused", err.Error())
		return
	}
	for _, n := range added {
		add("account "+n, "restored", "")
	}
	var sk []string
	for n := range skipped {
		sk = append(sk, n)
	}
	sort.Strings(sk)
	for _, n := range sk {
		outcome := "skipped"
		if skipped[n] == "exists here" {
			outcome = "present"
		}
		add("account "+n, outcome, skipped[n])
	}
}

// restoreContainers creates the backup's containers that do not exist
// here, each config accepted as at create (signature, trust, settings).
func (s *Server) restoreContainers(ctx context.Context, b *backup.Backup, names []string, dry bool, add func(item, outcome, detail string)) {
	for _, n := range names {
		rest, ok := strings.CutPrefix(n, "containers/")
		if !ok || !strings.HasSuffix(rest, "/config.conf") {
			continue
		}
		name := strings.TrimSuffix(rest, "/config.conf")
		item := "container " + name
		f := container.ConfigFile{Source: "backup: config of " + name, Text: b.Files[n], Sig: b.Files[n+".sig"], Pem: b.Files[n+".cert"]}
		_, _, _, _, _, lerr := s.Containers.ContainerDir(name)
		exists := lerr == nil
		if dry {
			if exists {
				add(item, "present", "")
			} else {
				add(item, "would restore", "")
			}
			continue
		}
		c, err := s.Containers.Create(ctx, f)
		switch {
		case err != nil && exists:
			add(item, "refused", "a container of that name with another config exists here")
		case err != nil:
			add(item, "refused", err.Error())
		case exists:
			add(item, "present", "")
		default:
			add(item, "restored", c.GetUuid())
		}
	}
}
