package api

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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

// AuditExport streams the raw trail file as it is on the device (up to
// its length when the export began), then its checkpoints file: what an
// auditor archives before AuditArchive frees the space. It works also
// while the trail is full (it is the remedy).
func (s *Server) AuditExport(_ *cmlv1.Empty, stream cmlv1.Control_AuditExportServer) (err error) {
	ctx := stream.Context()
	if err := s.auditor(ctx); err != nil {
		return err
	}
	t, err := s.trail()
	if err != nil {
		return err
	}
	// Recorded before the trail is read, so that the export holds its
	// own record and an archive of it can be confirmed; a failure is
	// recorded after. While the trail cannot take even this record, the
	// export goes on: it is the way out, and the archive's rotation
	// record names the auditor.
	s.audit(ctx, "/cml.v1.Control/AuditExport", "trail", nil)
	defer func() {
		if err != nil {
			s.audit(ctx, "/cml.v1.Control/AuditExport", "trail", err)
		}
	}()
	send := func(path string, trail bool, limit int64) error {
		f, err := os.Open(path)
		if errors.Is(err, os.ErrNotExist) && !trail {
			return nil
		}
		if err != nil {
			return err
		}
		defer f.Close()
		if limit < 0 {
			st, err := f.Stat()
			if err != nil {
				return err
			}
			limit = st.Size()
		}
		buf := make([]byte, 1<<20)
		for limit > 0 {
			n, rerr := f.Read(buf[:min(int64(len(buf)), limit)])
			if n > 0 {
				c := &cmlv1.AuditExportChunk{Checkpoints: buf[:n]}
				if trail {
					c = &cmlv1.AuditExportChunk{Trail: buf[:n]}
				}
				if err := stream.Send(c); err != nil {
					return err
				}
				limit -= int64(n)
			}
			if rerr == io.EOF {
				return nil
			}
			if rerr != nil {
				return rerr
			}
		}
		return nil
	}
	if err := send(t.Path(), true, -1); err != nil {
		return err
	}
	return send(t.Path()+".checkpoints", false, -1)
}

// AuditArchive rotates away the records an auditor confirms to hold: the
// trail's first size bytes, whose SHA-256 must match, must be the whole
// trail (records that came in since the export are exported first), and
// a collector, when there is one, must have received it too. The
// rotation record names the auditor; the trail goes on from the rotated
// state and verifies. It works while the trail is full: it frees it.
func (s *Server) AuditArchive(ctx context.Context, r *cmlv1.AuditArchiveRequest) (*cmlv1.AuditArchiveResponse, error) {
	if err := s.auditor(ctx); err != nil {
		return nil, err
	}
	t, err := s.trail()
	if err != nil {
		return nil, err
	}
	want, err := hex.DecodeString(r.GetSha256())
	if err != nil || len(want) != sha256.Size {
		return nil, errdefs.InvalidArgument("audit archive: sha256 is not a SHA-256 in hex")
	}
	var mismatch string
	confirmed := func(n int64) bool {
		if uint64(n) != r.GetSize() {
			mismatch = fmt.Sprintf("the trail holds %d bytes, the archive %d: export again", n, r.GetSize())
			return false
		}
		f, err := os.Open(t.Path())
		if err != nil {
			mismatch = err.Error()
			return false
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.CopyN(h, f, n); err != nil {
			mismatch = err.Error()
			return false
		}
		if !bytes.Equal(h.Sum(nil), want) {
			mismatch = "the archive's SHA-256 does not match the trail: export again"
			return false
		}
		// With a collector, its copy stays whole too.
		if s.Forwarder != nil && !s.Forwarder.Confirmed(n) {
			mismatch = fmt.Sprintf("the collector has not received the whole trail yet (it lags %d bytes): try again shortly", s.Forwarder.Lag())
			return false
		}
		return true
	}
	records, _, _, _ := t.Status()
	who := "an auditor"
	if a := s.account(ctx); a != nil {
		who = "auditor " + a.Name
	}
	if err := t.RotateAfter(confirmed, who+" archived them (SHA-256 "+r.GetSha256()+")"); err != nil {
		if mismatch != "" {
			return nil, errdefs.FailedPrecondition("audit archive: %s", mismatch)
		}
		return nil, err
	}
	return &cmlv1.AuditArchiveResponse{Records: proto.Uint64(records), Bytes: proto.Uint64(r.GetSize())}, nil
}
