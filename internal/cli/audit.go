package cli

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
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
			for {
				r, err := st.Recv()
				if errors.Is(err, io.EOF) {
					return nil
				}
				if err != nil {
					return err
				}
				fmt.Fprintln(a.stdout, string(r.GetJson()))
			}
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
	au.AddCommand(show, verify, status)
	return au
}
