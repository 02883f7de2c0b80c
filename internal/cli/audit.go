package cli

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/auditlog"
)

// auditCmd reads the audit trail (auditors only: root or group cml-audit).
func (a *app) auditCmd() *cobra.Command {
	au := &cobra.Command{Use: "audit", Short: "Read, select and verify the audit trail (auditors: root or group cml-audit)"}
	var q cmlv1.AuditQuery
	var typ, op, obj, outcome, since, until string
	var uid int
	var follow bool
	show := &cobra.Command{
		Use: "show", Short: "Print records of the audit trail, selected by type, operation, subject, object, outcome and time", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			set := func(name string, p **string, v string) {
				if cmd.Flags().Changed(name) {
					*p = proto.String(v)
				}
			}
			set("type", &q.Type, typ)
			set("operation", &q.Operation, op)
			set("object", &q.Object, obj)
			set("outcome", &q.Outcome, outcome)
			if cmd.Flags().Changed("uid") {
				q.SubjectUid = proto.Int32(int32(uid))
			}
			for _, t := range []struct {
				flag, v string
				p       **int64
			}{{"since", since, &q.SinceUnix}, {"until", until, &q.UntilUnix}} {
				if t.v == "" {
					continue
				}
				tm, err := time.Parse(time.RFC3339, t.v)
				if err != nil {
					return fmt.Errorf("--%s: %q is not an RFC 3339 time (2026-11-23T15:04:05Z)", t.flag, t.v)
				}
				*t.p = proto.Int64(tm.Unix())
			}
			q.Follow = proto.Bool(follow)
			c, err := a.client()
			if err != nil {
				return err
			}
			st, err := c.AuditShow(cmd.Context(), &q)
			if err != nil {
				return err
			}
			return recvAll(st.Recv, func(r *cmlv1.AuditRecord) { fmt.Fprintln(a.stdout, string(r.GetJson())) })
		},
	}
	f := show.Flags()
	f.StringVar(&typ, "type", "", "record type (management, container, daemon, network, device)")
	f.StringVar(&op, "operation", "", "operation prefix, e.g. container. or token.unlock")
	f.IntVar(&uid, "uid", 0, "subject uid")
	f.StringVar(&obj, "object", "", "object substring (a container name or UUID)")
	f.StringVar(&outcome, "outcome", "", "success or failure")
	f.StringVar(&since, "since", "", "from this time (RFC 3339)")
	f.StringVar(&until, "until", "", "up to this time (RFC 3339)")
	f.BoolVarP(&follow, "follow", "f", false, "keep printing new records")
	verify := &cobra.Command{
		Use: "verify", Short: "Have the device verify its trail against its signed checkpoints (off the device: cmlverify audit)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			r, err := c.AuditVerify(ctx, &cmlv1.Empty{})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.json(r)
			}
			verdict := "OK"
			if !r.GetOk() {
				verdict = "FAILED"
				a.code = 1
			}
			fmt.Fprintf(a.stdout, "audit trail %s: %d records, %d checkpoints verified, records 1..%d under a signed checkpoint\n", verdict, r.GetRecords(), r.GetCheckpoints(), r.GetLastSigned())
			for _, p := range r.GetProblems() {
				fmt.Fprintln(a.stdout, "  "+p)
			}
			return nil
		},
	}
	status := &cobra.Command{
		Use: "status", Short: "Show the trail's size and last checkpoint", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, cancel, err := a.call()
			if err != nil {
				return err
			}
			defer cancel()
			r, err := c.AuditStatus(ctx, &cmlv1.Empty{})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.json(r)
			}
			at := "never"
			if r.GetLastCheckpointUnix() > 0 {
				at = time.Unix(r.GetLastCheckpointUnix(), 0).UTC().Format(time.RFC3339)
			}
			capacity := "the filesystem's free space"
			if c := r.GetAuditSizeBytes(); c > 0 {
				capacity = fmt.Sprintf("%d MB (%d%% used)", c>>20, uint64(r.GetSizeBytes())*100/c)
			}
			fmt.Fprintf(a.stdout, "trail:           %s\nrecords:         %d (%d bytes)\ncapacity:        %s\nlast checkpoint: %d records, signed %s\n", r.GetPath(), r.GetRecords(), r.GetSizeBytes(), capacity, r.GetLastCheckpointSize(), at)
			if r.GetCollector() != "" {
				fmt.Fprintf(a.stdout, "forwarded to:    %s (%d bytes behind)\n", r.GetCollector(), r.GetForwardingLagBytes())
			}
			return nil
		},
	}
	au.AddCommand(show, verify, status, a.auditArchiveCmd())
	return au
}

// parseCert reads a PEM (or DER) certificate.
func parseCert(b []byte) (*x509.Certificate, error) {
	if blk, _ := pem.Decode(b); blk != nil {
		b = blk.Bytes
	}
	return x509.ParseCertificate(b)
}

// auditArchiveCmd copies the raw trail and its checkpoints off the device
// and, once the copy is on disk and its chain checks out, has the device
// rotate those records away (the remedy for a full trail without a
// collector).
func (a *app) auditArchiveCmd() *cobra.Command {
	var out string
	var keep bool
	cmd := &cobra.Command{
		Use:   "archive --out DIR",
		Short: "Copy the audit trail and its checkpoints into DIR, then free the device's trail (auditors; also while it is full)",
		Long: "Writes DIR/audit-<time>.log and .checkpoints (verify them anywhere with cmlverify audit --cert <device tls.pem>), checks\n" +
			"the copy's sequence and hash chain, and only then asks the device to rotate exactly those bytes away (confirmed by\n" +
			"their SHA-256). --keep copies without rotating.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return fmt.Errorf("audit archive needs --out DIR")
			}
			return a.rpc(func(ctx context.Context, c cmlv1.ControlClient) error {
				// Records that come in between the copy and the
				// confirmation make the device refuse it: copy again
				// (a full trail takes none).
				for try := 1; ; try++ {
					err := a.archiveOnce(ctx, c, out, keep)
					if try == 3 || err == nil || !strings.Contains(err.Error(), "export again") {
						return err
					}
				}
			})
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "directory for the copy")
	cmd.Flags().BoolVar(&keep, "keep", false, "copy only; leave the records on the device")
	return cmd
}

// archiveOnce exports the trail into dir and, unless keep, confirms it.
func (a *app) archiveOnce(ctx context.Context, c cmlv1.ControlClient, out string, keep bool) error {
	st, err := c.AuditExport(ctx, &cmlv1.Empty{})
	if err != nil {
		return err
	}
	var trail, cps []byte
	if err := recvAll(st.Recv, func(m *cmlv1.AuditExportChunk) {
		trail, cps = append(trail, m.GetTrail()...), append(cps, m.GetCheckpoints()...)
	}); err != nil {
		return err
	}
	// The copy must hold together before the device drops
	// its records: consecutive sequence numbers, an intact
	// hash chain and tree (signatures are checked with the
	// device's certificate by cmlverify audit).
	notes, err := auditlog.ReadCheckpoints(cps)
	if err != nil {
		return fmt.Errorf("the exported checkpoints: %w", err)
	}
	var keys []crypto.PublicKey
	if id, err := c.DeviceInfo(ctx, &cmlv1.Empty{}); err == nil {
		if cert, err := parseCert(id.GetTlsCertificate()); err == nil {
			keys = append(keys, cert.PublicKey)
		}
	}
	if r := auditlog.Verify(trail, notes, nil, keys); !r.OK() {
		return fmt.Errorf("the exported trail does not hold together (%d problems, first: %s): nothing was rotated", len(r.Problems), r.Problems[0].Text)
	}
	if err := os.MkdirAll(out, 0o700); err != nil {
		return err
	}
	base := filepath.Join(out, "audit-"+time.Now().UTC().Format("20060102T150405Z")+".log")
	if err := atomicfile.Write(base, trail, 0o600); err != nil {
		return err
	}
	if err := atomicfile.Write(base+".checkpoints", cps, 0o600); err != nil {
		return err
	}
	sum := sha256.Sum256(trail)
	fmt.Fprintf(a.stdout, "archived %d bytes to %s (SHA-256 %x) and its checkpoints\n", len(trail), base, sum)
	if keep {
		return nil
	}
	res, err := c.AuditArchive(ctx, &cmlv1.AuditArchiveRequest{Size: proto.Uint64(uint64(len(trail))), Sha256: proto.String(hex.EncodeToString(sum[:]))})
	if err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "the device rotated away %d records (%d bytes)\n", res.GetRecords(), res.GetBytes())
	return nil
}

// recvAll calls fn with each message of a server stream until it ends.
func recvAll[M any](recv func() (M, error), fn func(M)) error {
	for {
		m, err := recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		fn(m)
	}
}
