package api

import (
	"bytes"
	"context"
	"crypto"
	"encoding/json"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/auditlog"
	"github.com/cmlproject/cml/internal/errdefs"
)

// AuditGroup is the local group whose members may read the audit trail
// (besides root), until users and roles replace this check.
const AuditGroup = "cml-audit"

// auditor refuses callers who may not read the audit trail (FAU_SAR.2).
// With accounts the authorization table already decided (the auditor
// role); without, only root and members of the cml-audit group.
func (s *Server) auditor(ctx context.Context) error {
	if s.Accounts != nil {
		return nil
	}
	sub := audit.SubjectFrom(ctx)
	if sub == nil {
		sub = subject(ctx) // streams pass the unary interceptor by
	}
	if sub == nil {
		return errdefs.PermissionDenied("reading the audit trail needs the auditor role")
	}
	if sub.UID == 0 {
		return nil
	}
	if g, err := user.LookupGroup(AuditGroup); err == nil {
		if u, err := user.LookupId(strconv.Itoa(int(sub.UID))); err == nil {
			if ids, err := u.GroupIds(); err == nil && slices.Contains(ids, g.Gid) {
				return nil
			}
		}
	}
	return errdefs.PermissionDenied("reading the audit trail needs the auditor role (root or group %s)", AuditGroup)
}

func (s *Server) trail() (*audit.FileSink, error) {
	if s.Trail == nil {
		return nil, errdefs.FailedPrecondition("this daemon keeps no audit trail file")
	}
	return s.Trail, nil
}

// selects reports whether a record matches a query.
func selects(q *cmlv1.AuditQuery, line []byte) bool {
	var e audit.Event
	if json.Unmarshal(line, &e) != nil {
		return false
	}
	switch {
	case q.Type != nil && e.Type != q.GetType(),
		q.Operation != nil && !strings.HasPrefix(e.Operation, q.GetOperation()),
		q.Object != nil && !strings.Contains(e.Object, q.GetObject()),
		q.Outcome != nil && e.Outcome != q.GetOutcome(),
		q.SubjectUid != nil && (e.Subject == nil || e.Subject.UID != q.GetSubjectUid()),
		q.SinceUnix != nil && e.Time.Unix() < q.GetSinceUnix(),
		q.UntilUnix != nil && e.Time.Unix() > q.GetUntilUnix():
		return false
	}
	return true
}

func (s *Server) AuditShow(q *cmlv1.AuditQuery, stream cmlv1.Control_AuditShowServer) (err error) {
	ctx := stream.Context()
	if sub := subject(ctx); sub != nil {
		ctx = audit.WithSubject(ctx, *sub)
	}
	// Reading the trail is itself recorded (who read it, with which
	// selection), refused reads included.
	defer func() { s.audit(ctx, "/cml.v1.Control/AuditShow", q.String(), err) }()
	if err := s.auditor(ctx); err != nil {
		return err
	}
	t, err := s.trail()
	if err != nil {
		return err
	}
	f, err := os.Open(t.Path())
	if err != nil {
		return err
	}
	defer f.Close()
	var pending []byte
	buf := make([]byte, 256<<10)
	for {
		n, rerr := f.Read(buf)
		pending = append(pending, buf[:n]...)
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			line := pending[:i]
			if selects(q, line) {
				if err := stream.Send(&cmlv1.AuditRecord{Json: append([]byte(nil), line...)}); err != nil {
					return err
				}
			}
			pending = pending[i+1:]
		}
		if n > 0 {
			continue
		}
		if rerr != nil && !q.GetFollow() {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(300 * time.Millisecond):
		}
	}
}

func (s *Server) AuditVerify(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.AuditVerifyResponse, error) {
	if err := s.auditor(ctx); err != nil {
		return nil, err
	}
	t, err := s.trail()
	if err != nil {
		return nil, err
	}
	pub := t.Public()
	if pub == nil {
		return nil, errdefs.FailedPrecondition("the trail has no checkpoint key")
	}
	t.Checkpoint()
	log, err := os.ReadFile(t.Path())
	if err != nil {
		return nil, err
	}
	var notes [][]byte
	if b, err := os.ReadFile(t.Path() + ".checkpoints"); err == nil {
		if notes, err = auditlog.ReadCheckpoints(b); err != nil {
			return nil, err
		}
	}
	r := auditlog.Verify(log, notes, nil, []crypto.PublicKey{pub})
	out := &cmlv1.AuditVerifyResponse{Ok: proto.Bool(r.OK()), Records: proto.Uint64(r.Entries), Checkpoints: proto.Uint32(uint32(r.Checkpoints)), LastSigned: proto.Uint64(r.LastSigned)}
	for _, p := range r.Problems {
		out.Problems = append(out.Problems, p.Kind+": "+p.Text)
	}
	if !r.OK() {
		// An integrity violation of the trail itself (CR 3.4(2)).
		s.Audit.Record(ctx, audit.Event{Type: "daemon", Operation: "audit.verify", Subject: audit.SubjectFrom(ctx), Outcome: audit.Failure, Reason: out.Problems[0]})
	}
	return out, nil
}

func (s *Server) AuditStatus(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.AuditStatusResponse, error) {
	if err := s.auditor(ctx); err != nil {
		return nil, err
	}
	t, err := s.trail()
	if err != nil {
		return nil, err
	}
	n, size, signed, at := t.Status()
	out := &cmlv1.AuditStatusResponse{Records: proto.Uint64(n), SizeBytes: proto.Uint64(uint64(size)), LastCheckpointSize: proto.Uint64(signed), LastCheckpointUnix: proto.Int64(at), Path: proto.String(t.Path()),
		AuditSizeBytes: proto.Uint64(uint64(t.Capacity()))}
	if s.Forwarder != nil {
		out.Collector, out.ForwardingLagBytes = proto.String(s.Forwarder.Addr), proto.Uint64(s.Forwarder.Lag())
	}
	return out, nil
}
