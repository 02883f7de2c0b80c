package api

import (
	"context"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/access"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/errdefs"
)

type accountKey struct{}

// account resolves the caller's account (nil: none). Local socket callers
// map by uid (root: the built-in administrator; group cml-audit: the
// built-in auditor).
func (s *Server) account(ctx context.Context) *access.Account {
	if a, ok := ctx.Value(accountKey{}).(*access.Account); ok {
		return a
	}
	if s.Accounts == nil {
		return nil
	}
	if cn, remote := remoteName(ctx); remote {
		a, ok := s.Accounts.ByCert(cn)
		if !ok {
			return nil
		}
		return a
	}
	sub := subject(ctx)
	if sub == nil {
		return nil
	}
	a, ok := s.Accounts.Local(int(sub.UID))
	if !ok {
		return nil
	}
	return a
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
// PermissionDenied, audited by the caller's interceptor. Without an
// account store (unit tests of other parts) everything is allowed.
func (s *Server) authorize(ctx context.Context, fullMethod string, req any) (context.Context, error) {
	if s.Accounts == nil {
		return ctx, nil
	}
	a := s.account(ctx)
	method := strings.TrimPrefix(fullMethod, "/cml.v1.Control/")
	ctr := containerOf(req)
	if ctr != "" && a != nil && a.Has(access.User) {
		// The scope is by name; a UUID names the same container.
		if st, err := s.Containers.State(ctr); err == nil {
			ctr = st.GetName()
		}
	}
	if err := access.Allowed(a, method, ctr); err != nil {
		return ctx, errdefs.PermissionDenied("%s refused: %v", method, err)
	}
	if a != nil {
		ctx = context.WithValue(ctx, accountKey{}, a)
		if sub := audit.SubjectFrom(ctx); sub != nil {
			sub.Account = a.Name
			ctx = audit.WithSubject(ctx, *sub)
		}
	}
	return ctx, nil
}

// authStream authorizes a stream on its first message (where an exec or
// logs stream names its container).
type authStream struct {
	grpc.ServerStream
	s      *Server
	method string
	ctx    context.Context
	done   bool
}

func (a *authStream) Context() context.Context { return a.ctx }

func (a *authStream) RecvMsg(m any) error {
	if err := a.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if a.done {
		return nil
	}
	a.done = true
	ctx, err := a.s.authorize(a.ctx, a.method, m)
	if err != nil {
		a.s.audit(a.ctx, a.method, containerOf(m), err)
		return a.s.toStatus(err)
	}
	a.ctx = ctx
	return nil
}

func accountInfo(a access.Account) *cmlv1.AccountInfo {
	out := &cmlv1.AccountInfo{Name: proto.String(a.Name), Containers: a.Containers, Locked: proto.Bool(a.Locked), BuiltIn: proto.Bool(a.BuiltIn), CertNames: a.CertNames}
	for _, r := range a.Roles {
		out.Roles = append(out.Roles, string(r))
	}
	for _, u := range a.LocalUIDs {
		out.LocalUids = append(out.LocalUids, int32(u))
	}
	return out
}

func roles(rs []string) []access.Role {
	var out []access.Role
	for _, r := range rs {
		out = append(out, access.Role(r))
	}
	return out
}

func (s *Server) Whoami(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.AccountInfo, error) {
	a := s.account(ctx)
	if a == nil {
		return nil, errdefs.PermissionDenied("the caller has no account")
	}
	return accountInfo(*a), nil
}

func (s *Server) UserAdd(ctx context.Context, r *cmlv1.AccountInfo) (*cmlv1.AccountInfo, error) {
	var uids []int
	for _, u := range r.GetLocalUids() {
		uids = append(uids, int(u))
	}
	a := access.Account{Name: r.GetName(), Roles: roles(r.GetRoles()), LocalUIDs: uids, Containers: r.GetContainers(), CertNames: r.GetCertNames()}
	if err := s.Accounts.Add(a); err != nil {
		return nil, errdefs.InvalidArgument("user add: %v", err)
	}
	return accountInfo(a), nil
}

func (s *Server) UserRemove(ctx context.Context, r *cmlv1.AccountRef) (*cmlv1.Empty, error) {
	if err := s.Accounts.Remove(r.GetName()); err != nil {
		return nil, errdefs.InvalidArgument("user remove: %v", err)
	}
	return &cmlv1.Empty{}, nil
}

func (s *Server) UserList(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.AccountList, error) {
	out := &cmlv1.AccountList{}
	for _, a := range s.Accounts.List() {
		out.Accounts = append(out.Accounts, accountInfo(a))
	}
	return out, nil
}

func (s *Server) UserSet(ctx context.Context, r *cmlv1.UserSetRequest) (*cmlv1.AccountInfo, error) {
	var rs []access.Role
	if r.GetSetRoles() {
		rs = roles(r.GetRoles())
	}
	var cs []string
	if r.GetSetContainers() {
		cs = append([]string{}, r.GetContainers()...)
	}
	a, err := s.Accounts.Set(r.GetName(), rs, cs, r.Locked)
	if err != nil {
		return nil, errdefs.InvalidArgument("user set: %v", err)
	}
	return accountInfo(a), nil
}
