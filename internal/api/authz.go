package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/access"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/errdefs"
)

type accountKey struct{}
type sessionKey struct{}

// SessionMetadata is the call metadata that carries a session token.
const SessionMetadata = "cml-session"

// principal is who is on the other end of the connection: a local uid
// (SO_PEERCRED) or a remote client certificate (verified at the TLS
// handshake).
func principal(ctx context.Context) (access.Principal, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return access.Principal{}, false
	}
	switch ai := p.AuthInfo.(type) {
	case PeerCred:
		return access.Principal{Local: true, UID: int(ai.UID)}, true
	case credentials.TLSInfo:
		if cs := ai.State.PeerCertificates; len(cs) > 0 {
			fp := sha256.Sum256(cs[0].Raw)
			return access.Principal{CertName: cs[0].Subject.CommonName, CertFP: hex.EncodeToString(fp[:])}, true
		}
	}
	return access.Principal{}, false
}

func sessionToken(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(SessionMetadata); len(v) == 1 {
		return v[0]
	}
	return ""
}

// account is the caller's account as authorization decided it (nil:
// none).
func (s *Server) account(ctx context.Context) *access.Account {
	a, _ := ctx.Value(accountKey{}).(*access.Account)
	return a
}

// session is the caller's session (nil: authenticated per call by its
// uid or certificate alone).
func session(ctx context.Context) *access.Session {
	se, _ := ctx.Value(sessionKey{}).(*access.Session)
	return se
}

// mapped is the account a connection's principal maps to without a
// login: a local uid (root: the built-in administrator; group cml-audit:
// the built-in auditor) or a client certificate's name.
func (s *Server) mapped(p access.Principal) (*access.Account, bool) {
	if p.Local {
		return s.Accounts.Local(p.UID)
	}
	return s.Accounts.ByCert(p.CertName)
}

// stillValid re-checks a remote caller's certificate chain on every
// call, so that a CRL loaded or an owner CA removed while a connection is
// open takes effect at once, not at its next handshake.
func (s *Server) stillValid(ctx context.Context) error {
	pr, ok := peer.FromContext(ctx)
	if !ok || s.Trust == nil {
		return nil
	}
	ti, ok := pr.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return nil
	}
	if err := s.Trust.VerifyClient(ti.State.PeerCertificates); err != nil {
		return errdefs.Unauthenticated("%v", err)
	}
	return nil
}

// identify authenticates a call: by its session token when it carries
// one, else by the connection's uid or certificate alone, which is
// enough only for an account without a password (with one, the
// password is a second factor and the caller must log in). Under
// limited trust in root, local root's uid alone may only set the root
// account's first password.
func (s *Server) identify(ctx context.Context, method string, req any) (*access.Account, *access.Session, context.Context, error) {
	p, ok := principal(ctx)
	if !ok {
		return nil, nil, nil, nil
	}
	if err := s.stillValid(ctx); err != nil {
		return nil, nil, nil, err
	}
	if tok := sessionToken(ctx); tok != "" {
		se, sctx, err := s.Sessions.Use(tok, p)
		if err != nil {
			return nil, nil, nil, errdefs.Unauthenticated("%v", err)
		}
		a, ok := s.Accounts.Get(se.Account)
		if !ok {
			return nil, nil, nil, errdefs.Unauthenticated("%v", access.ErrNoSession)
		}
		return a, &se, sctx, nil
	}
	a, ok := s.mapped(p)
	switch {
	case !ok:
		return nil, nil, nil, nil
	case a.HasPassword():
		return nil, nil, nil, errdefs.Unauthenticated("account %s authenticates with a password: log in first (cmlctl login)", a.Name)
	case p.Local && a.Name == "root" && s.Accounts.LimitedRootTrust:
		if r, ok := req.(*cmlv1.PasswdRequest); ok && method == "UserPasswd" && (r.GetName() == "" || r.GetName() == "root") {
			return a, nil, nil, nil // setting root's first password
		}
		return nil, nil, nil, errdefs.Unauthenticated("limited trust in root: set the root account's password (cmlctl user passwd) and log in (cmlctl login)")
	case !p.Local && s.Accounts.Policy().RemoteMFA:
		return nil, nil, nil, errdefs.Unauthenticated("the policy wants a password besides the certificate (remote_mfa), and account %s has none", a.Name)
	}
	return a, nil, nil, nil
}

// containerOf names the container a request acts on ("" for none).
func containerOf(req any) string {
	switch r := req.(type) {
	case *cmlv1.ContainerRef:
		return r.GetNameOrUuid()
	case *cmlv1.StopRequest:
		return r.GetNameOrUuid()
	case *cmlv1.KillRequest:
		return r.GetNameOrUuid()
	case *cmlv1.LogsRequest:
		return r.GetNameOrUuid()
	case *cmlv1.NetworkRequest:
		return r.GetContainer()
	case *cmlv1.ChangePinRequest:
		return r.GetNameOrUuid()
	case *cmlv1.UpdateConfigRequest:
		return r.GetNameOrUuid()
	case *cmlv1.ExecRequest:
		return r.GetStart().GetNameOrUuid()
	}
	return ""
}

// authorize decides a call against the table (access.Table); refusals are
// PermissionDenied (or Unauthenticated), audited by the caller's
// interceptor. Without an account store (unit tests of other parts)
// everything is allowed. The returned context ends with the caller's
// session; done releases it when the call ends. A refusal's context
// names the account that was refused, for its audit record.
func (s *Server) authorize(ctx context.Context, fullMethod string, req any) (context.Context, func(), error) {
	done := func() {}
	if s.Accounts == nil {
		return ctx, done, nil
	}
	method := strings.TrimPrefix(fullMethod, "/cml.v1.Control/")
	if rule, ok := access.Table[method]; ok && rule.Public {
		return ctx, done, nil
	}
	a, se, sctx, err := s.identify(ctx, method, req)
	if err != nil {
		return ctx, done, errdefs.Wrap(errdefs.ErrUnauthenticated, err, "%s refused", method)
	}
	ctr := containerOf(req)
	if ctr != "" && a != nil && a.Has(access.User) {
		// The scope is by name; a UUID names the same container.
		if st, err := s.Containers.State(ctr); err == nil {
			ctr = st.GetName()
		}
	}
	if a != nil {
		// Named also in the record of a refusal.
		ctx = context.WithValue(ctx, accountKey{}, a)
		if sub := audit.SubjectFrom(ctx); sub != nil {
			sub.Account = a.Name
			ctx = audit.WithSubject(ctx, *sub)
		}
	}
	if err := access.Allowed(a, method, ctr); err != nil {
		return ctx, done, errdefs.PermissionDenied("%s refused: %v", method, err)
	}
	if se == nil {
		return ctx, done, nil
	}
	ctx = context.WithValue(ctx, sessionKey{}, se)
	cctx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(sctx, func() { cancel(access.ErrSessionEnded) })
	return cctx, func() { stop(); cancel(nil) }, nil
}

// authStream authorizes a stream on its first message (where an exec or
// logs stream names its container); later messages (an exec's input)
// count as activity of the caller's session.
type authStream struct {
	grpc.ServerStream
	s      *Server
	method string
	ctx    context.Context
	done   bool
	// release ends the stream's hold on the caller's session.
	release func()
}

func (a *authStream) Context() context.Context { return a.ctx }

func (a *authStream) RecvMsg(m any) error {
	if err := a.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if a.done {
		if se := session(a.ctx); se != nil {
			a.s.Sessions.Touch(se.ID)
		}
		return nil
	}
	a.done = true
	ctx, release, err := a.s.authorize(a.ctx, a.method, m)
	if err != nil {
		a.s.audit(ctx, a.method, containerOf(m), err)
		return a.s.toStatus(err)
	}
	a.ctx, a.release = ctx, release
	return nil
}
