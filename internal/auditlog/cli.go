package auditlog

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

// ErrFailed is a trail that does not verify (exit status 1).
var ErrFailed = errors.New("audit trail does not verify")

// ReadCheckpoints reads a checkpoints file (JSON lines, one signed note
// each).
func ReadCheckpoints(b []byte) ([][]byte, error) {
	var out [][]byte
	for i, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l == "" {
			continue
		}
		var c struct {
			Note string `json:"note"`
		}
		if err := json.Unmarshal([]byte(l), &c); err != nil || c.Note == "" {
			return nil, fmt.Errorf("checkpoints line %d is not a checkpoint", i+1)
		}
		out = append(out, []byte(c.Note))
	}
	return out, nil
}

// keysFromPEM reads the public keys of the certificates in a PEM file
// (the device's identity certificate, or its chain).
func keysFromPEM(path string) ([]crypto.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var keys []crypto.PublicKey
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type == "CERTIFICATE" {
			c, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				return nil, err
			}
			keys = append(keys, c.PublicKey)
		}
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%s holds no certificate", path)
	}
	return keys[:1], nil // the first certificate is the device's
}

// NewCommand is `cmlverify audit`.
func NewCommand(out io.Writer) *cobra.Command {
	var checkpoints, cert, saved string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "audit <audit.log>",
		Short: "Verify a device's audit trail: sequence, hash chain, Merkle root at every signed checkpoint, truncation",
		Long: `cmlverify audit checks an audit trail copied off a device and exits 0
only when it verifies. It names the first record that was modified,
deleted, inserted or reordered, a rewritten history, and a truncation.

  cmlverify audit --cert device.pem --checkpoints audit.log.checkpoints audit.log
  cmlverify audit --cert device.pem --checkpoints audit.log.checkpoints --checkpoint saved.note audit.log

--checkpoint is a checkpoint kept off the device (a collector's copy):
the only defence against root on the device rewriting the trail and
re-signing it.`,
		Args:          cobra.ExactArgs(1),
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			keys, err := keysFromPEM(cert)
			if err != nil {
				return fmt.Errorf("--cert: %w", err)
			}
			log, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			var notes [][]byte
			if checkpoints != "" {
				b, err := os.ReadFile(checkpoints)
				if err != nil {
					return err
				}
				if notes, err = ReadCheckpoints(b); err != nil {
					return err
				}
			}
			var sv []byte
			if saved != "" {
				if sv, err = os.ReadFile(saved); err != nil {
					return err
				}
			}
			r := Verify(log, notes, sv, keys)
			if asJSON {
				b, _ := json.Marshal(r)
				fmt.Fprintln(out, string(b))
			} else {
				verdict := "OK"
				if !r.OK() {
					verdict = "FAILED"
				}
				fmt.Fprintf(out, "audit trail %s: %d records, %d checkpoints verified, records 1..%d under a signed checkpoint\n", verdict, r.Entries, r.Checkpoints, r.LastSigned)
				for _, p := range r.Problems {
					fmt.Fprintf(out, "  %s: %s\n", p.Kind, p.Text)
				}
			}
			if !r.OK() {
				return ErrFailed
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&checkpoints, "checkpoints", "", "the device's checkpoints file (audit.log.checkpoints)")
	cmd.Flags().StringVar(&cert, "cert", "", "the device's identity certificate (PEM), whose key signs checkpoints")
	cmd.Flags().StringVar(&saved, "checkpoint", "", "a signed checkpoint kept off the device")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	cmd.MarkFlagRequired("cert")
	return cmd
}
