package cli

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/backup"
)

// backupCmd makes, checks and restores configuration backups
// (docs/backup.md).
func (a *app) backupCmd() *cobra.Command {
	b := &cobra.Command{Use: "backup", Short: "Make, check and restore signed, encrypted configuration backups (administrators)"}
	var out string
	create := &cobra.Command{
		Use: "create --out FILE", Short: "Write a backup of the device's configuration, signed by the device and encrypted to the owner's recipients", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("backup create needs --out FILE")
			}
			return a.rpc(func(ctx context.Context, c cmlv1.ControlClient) error {
				st, err := c.Backup(ctx, &cmlv1.Empty{})
				if err != nil {
					return err
				}
				var data []byte
				if err := recvAll(st.Recv, func(m *cmlv1.BackupChunk) { data = append(data, m.GetData()...) }); err != nil {
					return err
				}
				if err := atomicfile.Write(out, data, 0o600); err != nil {
					return err
				}
				sum := sha256.Sum256(data)
				fmt.Fprintf(a.stdout, "backup %s: %d bytes, sha256 %s\n", out, len(data), hex.EncodeToString(sum[:]))
				return nil
			})
		},
	}
	create.Flags().StringVar(&out, "out", "", "file to write the backup to")

	var identity, deviceCert string
	open := func(file string) (*backup.Backup, error) {
		if identity == "" {
			identity = os.Getenv("CML_BACKUP_IDENTITY")
		}
		if identity == "" {
			return nil, errors.New("opening a backup needs the owner's age identity: --identity FILE ($CML_BACKUP_IDENTITY)")
		}
		idf, err := os.Open(identity)
		if err != nil {
			return nil, err
		}
		defer idf.Close()
		ids, err := backup.ParseIdentities(idf)
		if err != nil {
			return nil, err
		}
		f, err := os.Open(file)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		bk, err := backup.Decrypt(f, ids)
		if err != nil {
			return nil, err
		}
		if deviceCert != "" {
			if err := signedBy(bk, deviceCert); err != nil {
				return nil, err
			}
		}
		return bk, nil
	}
	show := &cobra.Command{
		Use: "show FILE --identity KEY", Short: "Decrypt a backup, check its device signature and every file's sum, and list what it holds", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			bk, err := open(args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "backup of device %s, made %s by %s, signed by %q\n", bk.Info.Device, bk.Info.Created.Format("2006-01-02 15:04:05Z07:00"), bk.Info.By, bk.Chain[0].Subject.String())
			for _, n := range bk.Names() {
				fmt.Fprintf(a.stdout, "  %s (%d bytes)\n", n, len(bk.Files[n]))
			}
			return nil
		},
	}
	var dry bool
	restore := &cobra.Command{
		Use:   "restore FILE --identity KEY",
		Short: "Take a backup back onto a device: owner CAs, CRLs, missing accounts and containers (each config verified as at create)",
		Long: "Decrypts FILE here with the owner's identity (the device cannot: the backup is encrypted to the owner only), checks it,\n" +
			"and sends it to the device, which accepts it only when it is signed by itself or by a device of the same issuer.\n" +
			"What exists on the device is left as it is. --dry-run reports without changing anything.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			bk, err := open(args[0])
			if err != nil {
				return err
			}
			return a.rpc(func(ctx context.Context, c cmlv1.ControlClient) error {
				st, err := c.Restore(ctx)
				if err != nil {
					return err
				}
				p := bk.Plain
				first := true
				for first || len(p) > 0 {
					n := min(len(p), 512<<10)
					m := &cmlv1.RestoreChunk{Data: p[:n]}
					if first {
						m.DryRun = proto.Bool(dry)
					}
					if err := st.Send(m); err != nil {
						break // the reason comes with CloseAndRecv
					}
					p, first = p[n:], false
				}
				rep, err := st.CloseAndRecv()
				if err != nil {
					return err
				}
				rows := [][]string{}
				for _, it := range rep.GetItems() {
					rows = append(rows, []string{it.GetItem(), it.GetOutcome(), it.GetDetail()})
				}
				return a.table(rep, "ITEM\tOUTCOME\tDETAIL", rows)
			})
		},
	}
	restore.Flags().BoolVar(&dry, "dry-run", false, "check and report; change nothing")
	for _, c := range []*cobra.Command{show, restore} {
		c.Flags().StringVar(&identity, "identity", "", "the owner's age identity file ($CML_BACKUP_IDENTITY)")
		c.Flags().StringVar(&deviceCert, "device-cert", "", "require the backup to be signed by this device certificate, or a device it issued (PEM)")
	}
	b.AddCommand(create, show, restore)
	return b
}

// signedBy checks that the backup's signer is the certificate in file or
// was issued under it.
func signedBy(bk *backup.Backup, file string) error {
	pb, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	want, err := parseCert(pb)
	if err != nil {
		return fmt.Errorf("--device-cert: %w", err)
	}
	if err := bk.SignedUnder([]*x509.Certificate{want}); err != nil {
		return fmt.Errorf("the backup is signed by %q, not by %s: %v", bk.Chain[0].Subject.String(), file, err)
	}
	return nil
}
