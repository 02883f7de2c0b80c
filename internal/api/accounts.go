package api

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/access"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/errdefs"
)

// accountInfo is what the API shows of an account: never a password
// hash (the message has no field for one), but whether it has a password
// and whether it expired.
func (s *Server) accountInfo(a access.Account) *cmlv1.AccountInfo {
	out := &cmlv1.AccountInfo{Name: proto.String(a.Name), Containers: a.Containers, Locked: proto.Bool(a.Locked), BuiltIn: proto.Bool(a.BuiltIn), CertNames: a.CertNames,
		HasPassword: proto.Bool(a.HasPassword()), FailedLogins: proto.Uint32(uint32(a.Failures))}
	if a.HasPassword() && s.Accounts.Expired(&a) {
		out.PasswordExpired = proto.Bool(true)
	}
	if a.LockReason != "" {
		out.LockReason = proto.String(a.LockReason)
	}
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
	return s.accountInfo(*a), nil
}

func (s *Server) UserAdd(ctx context.Context, r *cmlv1.AccountInfo) (*cmlv1.AccountInfo, error) {
	var uids []int
	for _, u := range r.GetLocalUids() {
		uids = append(uids, int(u))
	}
	a := access.Account{Name: r.GetName(), Roles: roles(r.GetRoles()), LocalUIDs: uids, Containers: r.GetContainers(), CertNames: r.GetCertNames()}
	if err := s.Accounts.Add(a, []byte(r.GetPassword())); err != nil {
		return nil, errdefs.InvalidArgument("user add: %v", err)
	}
	got, _ := s.Accounts.Get(a.Name)
	return s.accountInfo(*got), nil
}

func (s *Server) UserRemove(ctx context.Context, r *cmlv1.AccountRef) (*cmlv1.Empty, error) {
	if err := s.Accounts.Remove(r.GetName()); err != nil {
		return nil, errdefs.InvalidArgument("user remove: %v", err)
	}
	s.Sessions.EndAccount(r.GetName())
	return &cmlv1.Empty{}, nil
}

func (s *Server) UserList(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.AccountList, error) {
	out := &cmlv1.AccountList{}
	for _, a := range s.Accounts.List() {
		out.Accounts = append(out.Accounts, s.accountInfo(a))
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
	if a.Locked {
		s.Sessions.EndAccount(a.Name) // a locked account's sessions end
	}
	return s.accountInfo(a), nil
}

// UserPasswd changes a password: the caller's own (with the old one, if
// it has one), or, by an administrator, another's; then the owner must
// change it at the next login and its sessions end.
func (s *Server) UserPasswd(ctx context.Context, r *cmlv1.PasswdRequest) (*cmlv1.Empty, error) {
	me := s.account(ctx)
	name := r.GetName()
	if name == "" {
		name = me.Name
	}
	p, _ := principal(ctx)
	if name == me.Name {
		if err := s.Accounts.ChangePassword(p, name, []byte(r.GetOldPassword()), []byte(r.GetNewPassword())); err != nil {
			return nil, loginError("password change", err)
		}
		return &cmlv1.Empty{}, nil
	}
	if !me.Has(access.Administrator) {
		return nil, errdefs.PermissionDenied("account %s may not change another account's password", me.Name)
	}
	if err := s.Accounts.ResetPassword(name, []byte(r.GetNewPassword())); err != nil {
		return nil, errdefs.InvalidArgument("password of %s: %v", name, err)
	}
	s.Sessions.EndAccount(name)
	return &cmlv1.Empty{}, nil
}

// loginError classes an authentication failure: wrong credentials are
// Unauthenticated with the one answer for every cause (CR 1.10; the
// audit record has the detail), an expired password FailedPrecondition,
// a new password against the policy InvalidArgument.
func loginError(what string, err error) error {
	switch {
	case errors.Is(err, access.ErrLoginFailed):
		return errdefs.Wrap(errdefs.ErrUnauthenticated, err, "%s failed", what)
	case errors.Is(err, access.ErrPasswordExpired):
		return errdefs.Wrap(errdefs.ErrFailedPrecondition, err, "%s", what)
	}
	return errdefs.InvalidArgument("%s: %v", what, err)
}

// Login authenticates by password (remote callers also by their
// certificate: multi-factor) and opens a session, or unlocks the
// caller's locked session.
func (s *Server) Login(ctx context.Context, r *cmlv1.LoginRequest) (*cmlv1.LoginResponse, error) {
	if s.Accounts == nil {
		return nil, errdefs.FailedPrecondition("this daemon has no accounts")
	}
	p, ok := principal(ctx)
	if !ok {
		return nil, errdefs.Unauthenticated("login: the connection has no identity")
	}
	name := r.GetName()
	if name == "" {
		a, ok := s.mapped(p)
		if !ok {
			return nil, errdefs.InvalidArgument("login: name the account (this caller maps to none)")
		}
		name = a.Name
		r.Name = proto.String(name) // for the audit record's object
	}
	a, err := s.Accounts.Authenticate(p, name, []byte(r.GetPassword()), []byte(r.GetNewPassword()))
	if err != nil {
		return nil, loginError("login", err)
	}
	if !p.Local && s.Accounts.Policy().RemoteMFA && !a.HasPassword() {
		return nil, loginError("login", access.ErrLoginFailed)
	}
	tok := sessionToken(ctx)
	var se access.Session
	if tok != "" {
		if got, ok := s.Sessions.Unlock(tok, p, a.Name); ok {
			se = got
		} else {
			tok = ""
		}
	}
	if tok == "" {
		if tok, se, err = s.Sessions.Open(a.Name, p); err != nil {
			return nil, errdefs.FailedPrecondition("login: %v", err)
		}
	}
	out := &cmlv1.LoginResponse{Token: proto.String(tok), Session: sessionInfo(se, se.ID), Account: s.accountInfo(*a)}
	return out, nil
}

func sessionInfo(se access.Session, current string) *cmlv1.SessionInfo {
	out := &cmlv1.SessionInfo{Id: proto.String(se.ID), Account: proto.String(se.Account), From: proto.String(se.Principal.String()),
		CreatedUnix: proto.Int64(se.Created.Unix()), LastUsedUnix: proto.Int64(se.LastUsed.Unix())}
	if se.Locked != "" {
		out.Locked = proto.String(se.Locked)
	}
	if se.ID == current {
		out.Current = proto.Bool(true)
	}
	return out
}

func currentID(ctx context.Context) string {
	if se := session(ctx); se != nil {
		return se.ID
	}
	return ""
}

func (s *Server) SessionList(ctx context.Context, r *cmlv1.SessionListRequest) (*cmlv1.SessionListResponse, error) {
	me := s.account(ctx)
	who := me.Name
	if r.GetAll() {
		if !me.Has(access.Administrator) && !me.Has(access.Auditor) {
			return nil, errdefs.PermissionDenied("account %s may list only its own sessions", me.Name)
		}
		who = ""
	}
	out := &cmlv1.SessionListResponse{}
	for _, se := range s.Sessions.List(who) {
		out.Sessions = append(out.Sessions, sessionInfo(se, currentID(ctx)))
	}
	return out, nil
}

// SessionEnd ends a session (CR 2.6): one's own, or as an administrator
// anyone's; calls and streams under it end.
func (s *Server) SessionEnd(ctx context.Context, r *cmlv1.SessionRef) (*cmlv1.SessionInfo, error) {
	me := s.account(ctx)
	id := r.GetId()
	if id == "" {
		if id = currentID(ctx); id == "" {
			return nil, errdefs.FailedPrecondition("session end: this call is not in a session (name one: cmlctl session list)")
		}
	}
	r.Id = proto.String(id) // for the audit record's object
	se, ok := s.Sessions.Get(id)
	if !ok || (se.Account != me.Name && !me.Has(access.Administrator)) {
		return nil, errdefs.NotFound("session end: no session %q of yours", id)
	}
	s.Sessions.End(id)
	if se.Account != me.Name {
		s.Audit.Record(ctx, audit.Event{Type: "access", Operation: "access.session.end", Subject: audit.SubjectFrom(ctx), Object: "account " + se.Account,
			Outcome: audit.Success, Reason: fmt.Sprintf("session %s of %s (%s) ended by %s", se.ID, se.Account, se.Principal, me.Name)})
	}
	return sessionInfo(se, ""), nil
}

// SessionLock locks the caller's own session (FTA_SSL.2): only a login
// unlocks it.
func (s *Server) SessionLock(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.SessionInfo, error) {
	id := currentID(ctx)
	if id == "" {
		return nil, errdefs.FailedPrecondition("session lock: this call is not in a session (log in first)")
	}
	s.Sessions.Lock(id, "locked by its owner")
	se, _ := s.Sessions.Get(id)
	return sessionInfo(se, id), nil
}

func (s *Server) policy() *cmlv1.AccessPolicy {
	p := s.Accounts.Policy()
	return &cmlv1.AccessPolicy{MinLength: proto.Uint32(uint32(p.MinLength)), MinClasses: proto.Uint32(uint32(p.MinClasses)), History: proto.Uint32(uint32(p.History)),
		MaxAgeDays: proto.Uint32(uint32(p.MaxAgeDays)), MaxFailures: proto.Uint32(uint32(p.MaxFailures)), IdleTimeoutSeconds: proto.Uint32(uint32(p.IdleTimeoutSeconds)),
		RemoteMfa: proto.Bool(p.RemoteMFA), LimitedRootTrust: proto.Bool(s.Accounts.LimitedRootTrust)}
}

func (s *Server) PolicyGet(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.AccessPolicy, error) {
	return s.policy(), nil
}

// PolicySet changes the fields the request sets; the audit record has
// the old and new policy in full.
func (s *Server) PolicySet(ctx context.Context, r *cmlv1.AccessPolicy) (*cmlv1.AccessPolicy, error) {
	if r.LimitedRootTrust != nil && r.GetLimitedRootTrust() != s.Accounts.LimitedRootTrust {
		return nil, errdefs.InvalidArgument("policy: limited_root_trust is a device setting (device.conf access { limited_root_trust })")
	}
	p := s.Accounts.Policy()
	old := p
	set := func(dst *int, v *uint32) {
		if v != nil {
			*dst = int(*v)
		}
	}
	set(&p.MinLength, r.MinLength)
	set(&p.MinClasses, r.MinClasses)
	set(&p.History, r.History)
	set(&p.MaxAgeDays, r.MaxAgeDays)
	set(&p.MaxFailures, r.MaxFailures)
	set(&p.IdleTimeoutSeconds, r.IdleTimeoutSeconds)
	if r.RemoteMfa != nil {
		p.RemoteMFA = r.GetRemoteMfa()
	}
	if err := s.Accounts.SetPolicy(p); err != nil {
		return nil, errdefs.InvalidArgument("policy: %v", err)
	}
	if err := s.Audit.Record(ctx, audit.Event{Type: "access", Operation: "access.policy", Subject: audit.SubjectFrom(ctx), Outcome: audit.Success,
		Reason: fmt.Sprintf("policy changed from %+v to %+v", old, p)}); err != nil {
		return nil, err
	}
	return s.policy(), nil
}
