// Package api serves cmld's control API (api/cml/v1) over gRPC on a local
// unix socket.
//
// It attaches the caller's kernel-verified identity (SO_PEERCRED) to each
// request, records every management operation and its outcome in the audit
// trail, and maps error classes to gRPC codes. It holds no lifecycle logic:
// that is package container. Authorization by role plugs in as one more
// interceptor here.
package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/term"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/access"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/container"
	"github.com/cmlproject/cml/internal/device"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/guestos"
	"github.com/cmlproject/cml/internal/oci"
	"github.com/cmlproject/cml/internal/trust"
)

// Server implements cmlv1.ControlServer.
type Server struct {
	cmlv1.UnimplementedControlServer
	Containers *container.Manager
	GuestOS    *guestos.Store
	Trust      *trust.Store
	// Downloads fetches guest OSes from https:// URLs; nil refuses URLs.
	Downloads *guestos.Downloader
	// Device holds the TPM identity and answers attestation challenges.
	Device *device.Identity
	// Network reports containers' effective networks; nil when the
	// daemon runs without network separation.
	Networks NetworkReporter
	Storage  Storage
	Audit    audit.Recorder
	// Trail is the audit trail auditors read and verify; Forwarder, when
	// set, sends it to a collector.
	Trail *audit.FileSink
	// Backups makes and takes back configuration backups; nil: none.
	Backups   *Backups
	Forwarder *audit.Forwarder
	// Accounts and their roles authorize every call (access.Table); nil
	// allows everything (tests of other parts).
	Accounts *access.Store
	// Sessions are the logins (with Accounts).
	Sessions *access.Sessions
	Log      *slog.Logger

	auditBroken atomic.Bool
	errRef      atomic.Uint64
}

// queries are read-only status calls, not audited (they would flood the
// trail with every poll of a status display).
var queries = map[string]bool{
	"/cml.v1.Control/List": true, "/cml.v1.Control/State": true,
	"/cml.v1.Control/GuestOSList": true, "/cml.v1.Control/Events": true,
	"/cml.v1.Control/CAList": true, "/cml.v1.Control/DeviceInfo": true,
	"/cml.v1.Control/CRLList": true, "/cml.v1.Control/Network": true,
	// Attest only reads; a verifier watching a fleet polls it.
	"/cml.v1.Control/Attest": true,
}

// objectOf names what a request acts on, for the audit record.
func objectOf(req any) string {
	switch r := req.(type) {
	case *cmlv1.ContainerRef, *cmlv1.StopRequest, *cmlv1.UpdateConfigRequest, *cmlv1.LogsRequest, *cmlv1.ChangePinRequest:
		return containerOf(req) // never a PIN
	case *cmlv1.KillRequest:
		return fmt.Sprintf("%s signal %d", r.GetNameOrUuid(), r.GetSignal())
	case *cmlv1.CreateRequest:
		if cfg, err := config.ParseContainer("", r.GetConfigText()); err == nil && len(r.GetConfigText()) > 0 {
			return cfg.GetName()
		}
		if r.GetConfig() != nil {
			return r.GetConfig().GetName()
		}
		return r.GetSource()
	case *cmlv1.AccountInfo:
		return "account " + r.GetName()
	case *cmlv1.AccountRef:
		return "account " + r.GetName()
	case *cmlv1.UserSetRequest:
		return "account " + r.GetName()
	case *cmlv1.LoginRequest:
		return "account " + r.GetName() // never the passwords
	case *cmlv1.PasswdRequest:
		return "account " + r.GetName()
	case *cmlv1.SessionRef:
		return "session " + r.GetId()
	case *cmlv1.AccessPolicy:
		return "policy"
	case *cmlv1.GuestOSInstallRequest:
		return r.GetDir() + r.GetUrl()
	case *cmlv1.CARemoveRequest:
		return r.GetFingerprint()
	case *cmlv1.CRLRemoveRequest:
		return r.GetRef()
	case *cmlv1.DeviceCSRRequest:
		return r.GetKey().String()
	case *cmlv1.DeviceCertRequest:
		if r.GetReplace() {
			return "replace"
		}
		return "install"
	case *cmlv1.GuestOSRemoveRequest:
		return fmt.Sprintf("%s %d", r.GetName(), r.GetVersion())
	case *cmlv1.ExecStart:
		if len(r.GetArgs()) > 0 {
			// argv[0] only: arguments may carry secrets.
			return r.GetNameOrUuid() + " " + r.GetArgs()[0]
		}
		return r.GetNameOrUuid()
	}
	return ""
}

func operationOf(method string) string {
	return "control." + strings.TrimPrefix(method, "/cml.v1.Control/")
}

// audit records a management call's outcome. The reason is the error's
// own text, before any conversion to a transport status. A record that
// cannot be written marks the trail broken (see checkAudit) and is
// returned as an error of class Unavailable.
func (s *Server) audit(ctx context.Context, method string, object string, err error) error {
	e := audit.Event{Type: "management", Operation: operationOf(method), Subject: subject(ctx), Object: object, Outcome: audit.Success}
	if e.Subject != nil {
		if a := s.account(ctx); a != nil {
			e.Subject.Account = a.Name // CR 2.12: the account, not only the uid
		}
	}
	if err != nil {
		e.Outcome = audit.Failure
		e.Reason = reasonOf(err)
		// A failed login's cause is for the trail only (the caller
		// gets one answer for all: CR 1.10).
		var le *access.LoginError
		if errors.As(err, &le) {
			e.Reason += " (" + le.Detail + ")"
		}
	}
	if aerr := s.Audit.Record(ctx, e); aerr != nil {
		s.auditBroken.Store(true)
		s.Log.Error("audit record failed", "operation", e.Operation, "err", aerr)
		return errdefs.Wrap(errdefs.ErrUnavailable, aerr, "audit trail")
	}
	return nil
}

// checkAudit refuses management calls while the audit trail cannot be
// written (fail closed: nothing happens unrecorded). While it is broken,
// each call first tries to record that it was requested; the first
// success ends the refusal.
func (s *Server) checkAudit(ctx context.Context, method, object string) error {
	if remedies[method] {
		return nil
	}
	// A full trail refuses before the operation runs, so that none runs
	// unrecorded (FAU_STG.4).
	if s.Trail != nil && s.Trail.Full() && !s.Trail.Recovered() {
		return errdefs.Unavailable("%s refused: the audit trail is full; an auditor must archive it first", strings.TrimPrefix(method, "/cml.v1.Control/"))
	}
	if !s.auditBroken.Load() {
		return nil
	}
	e := audit.Event{Type: "management", Operation: operationOf(method), Subject: subject(ctx), Object: object, Outcome: "requested"}
	if err := s.Audit.Record(ctx, e); err != nil {
		return errdefs.Unavailable("%s refused: the audit trail cannot be written", strings.TrimPrefix(method, "/cml.v1.Control/"))
	}
	s.auditBroken.Store(false)
	return nil
}

// UnaryInterceptor audits each management call and maps its error.
func (s *Server) UnaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if sub := subject(ctx); sub != nil {
		ctx = audit.WithSubject(ctx, *sub)
	}
	// Every call is authorized (one table for unary and stream calls);
	// refusals are audited as denied accesses.
	actx, release, aerr := s.authorize(ctx, info.FullMethod, req)
	if aerr != nil {
		s.audit(actx, info.FullMethod, objectOf(req), aerr)
		return nil, s.toStatus(aerr)
	}
	defer release()
	ctx = actx
	if queries[info.FullMethod] {
		resp, err := h(ctx, req)
		if l, ok := resp.(*cmlv1.ListResponse); ok && err == nil {
			s.ownOnly(ctx, l)
		}
		return resp, s.toStatus(err)
	}
	if err := s.checkAudit(ctx, info.FullMethod, objectOf(req)); err != nil {
		return nil, s.toStatus(err)
	}
	resp, err := h(ctx, req)
	if aerr := s.audit(ctx, info.FullMethod, objectOf(req), err); aerr != nil && err == nil {
		// Done but not recorded: the client must know.
		return nil, s.toStatus(errdefs.Wrap(errdefs.ErrUnavailable, aerr, "%s was carried out but could not be recorded", strings.TrimPrefix(info.FullMethod, "/cml.v1.Control/")))
	}
	return resp, s.toStatus(err)
}

// StreamInterceptor maps stream errors and refuses management streams
// while the audit trail is broken; streams audit themselves once they
// know their object.
func (s *Server) StreamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	ctx := ss.Context()
	if sub := subject(ctx); sub != nil {
		ctx = audit.WithSubject(ctx, *sub)
	}
	// Authorized on the first message (the request of a server stream,
	// the start of an exec), which names the container.
	as := &authStream{ServerStream: ss, s: s, method: info.FullMethod, ctx: ctx, release: func() {}}
	if !streamQueries[info.FullMethod] {
		if err := s.checkAudit(as.Context(), info.FullMethod, ""); err != nil {
			return s.toStatus(err)
		}
	}
	err := h(srv, as)
	as.release()
	return s.toStatus(err)
}

// remedies are the calls that free a full trail (an auditor's export and
// archive): refusing them while it is full would leave it full for good.
var remedies = map[string]bool{"/cml.v1.Control/AuditExport": true, "/cml.v1.Control/AuditArchive": true}

// streamQueries are the streams that only read.
var streamQueries = map[string]bool{"/cml.v1.Control/Events": true}

func (s *Server) List(ctx context.Context, _ *cmlv1.ListRequest) (*cmlv1.ListResponse, error) {
	cs := s.Containers.List()
	for _, c := range cs {
		s.storageInfo(c)
	}
	return &cmlv1.ListResponse{Containers: cs}, nil
}

// storageInfo adds how a container's data is protected: its token type,
// GyroidOS's cryptfs mode, the backend recorded for it, and whether its
// token is locked (read outside every lock).
func (s *Server) storageInfo(c *cmlv1.Container) {
	if s.Storage == nil {
		return
	}
	_, _, dir, cfg, _, err := s.Containers.ContainerDir(c.GetUuid())
	if err != nil || cfg.GetTokenType() == cmlv1.ContainerTokenType_NONE {
		return
	}
	c.TokenType = cfg.GetTokenType().Enum()
	c.CryptfsMode = cmlv1.CryptfsMode_NOT_IMPLEMENTED.Enum()
	if b, err := os.ReadFile(filepath.Join(dir, "backend")); err == nil {
		c.StorageBackend = proto.String(strings.TrimSpace(string(b)))
		c.CryptfsMode = cmlv1.CryptfsMode_AUTHENC.Enum()
	}
	c.TokenLocked = proto.Bool(s.Storage.TokenLocked(dir))
}

// configFile takes a config from a request: its exact bytes with signature
// when given, else the message rendered as an unsigned file.
func configFile(op, source string, cfg *cmlv1.ContainerConfig, text, sig, cert []byte) (container.ConfigFile, error) {
	if source == "" {
		source = "config"
	}
	if len(text) > 0 {
		return container.ConfigFile{Source: source, Text: text, Sig: sig, Pem: cert}, nil
	}
	if cfg == nil {
		return container.ConfigFile{}, errdefs.InvalidArgument("%s: no config", op)
	}
	if len(sig) > 0 {
		return container.ConfigFile{}, errdefs.InvalidArgument("%s: a signature needs the config's exact bytes (config_text)", op)
	}
	return container.UnsignedConfigFile(cfg, source)
}

func (s *Server) Create(ctx context.Context, r *cmlv1.CreateRequest) (*cmlv1.Container, error) {
	f, err := configFile("create", r.GetSource(), r.GetConfig(), r.GetConfigText(), r.GetSignature(), r.GetCertificate())
	if err != nil {
		return nil, err
	}
	return s.Containers.Create(ctx, f)
}

func (s *Server) Remove(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.Empty, error) {
	if err := s.Containers.Remove(ctx, r.GetNameOrUuid(), r.GetPin()); err != nil {
		return nil, err
	}
	s.collectGuestOS(ctx)
	return &cmlv1.Empty{}, nil
}

func (s *Server) Start(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.Container, error) {
	return s.Containers.Start(ctx, r.GetNameOrUuid(), container.StartOptions{Secret: r.GetPin()})
}

// Storage is the token side of encrypted storage: PIN changes, resets of
// locked tokens, and what a wipe cannot promise. Nil when the daemon has
// no storage stage.
type Storage interface {
	ChangePIN(ctx context.Context, id, name, dir string, cfg *cmlv1.ContainerConfig, oldPIN, newPIN []byte) error
	ResetToken(dir string) error
	TokenLocked(dir string) bool
}

func (s *Server) ChangePin(ctx context.Context, r *cmlv1.ChangePinRequest) (*cmlv1.Empty, error) {
	if s.Storage == nil {
		return nil, errdefs.FailedPrecondition("encrypted storage is not available on this device")
	}
	id, name, dir, cfg, _, err := s.Containers.ContainerDir(r.GetNameOrUuid())
	if err != nil {
		return nil, err
	}
	return &cmlv1.Empty{}, s.Storage.ChangePIN(ctx, id, name, dir, cfg, r.GetOldPin(), r.GetNewPin())
}

func (s *Server) TokenReset(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.Container, error) {
	if s.Storage == nil {
		return nil, errdefs.FailedPrecondition("encrypted storage is not available on this device")
	}
	_, name, dir, cfg, _, err := s.Containers.ContainerDir(r.GetNameOrUuid())
	if err != nil {
		return nil, err
	}
	if cfg.GetTokenType() == cmlv1.ContainerTokenType_NONE {
		return nil, errdefs.FailedPrecondition("container %s has no token (token_type NONE)", name)
	}
	if err := s.Storage.ResetToken(dir); err != nil {
		return nil, err
	}
	return s.Containers.State(r.GetNameOrUuid())
}

func (s *Server) Wipe(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.WipeResponse, error) {
	st, err := s.Containers.State(r.GetNameOrUuid())
	if err != nil {
		return nil, err
	}
	switch st.GetState() {
	case cmlv1.ContainerState_STOPPED, cmlv1.ContainerState_FAILED:
	default:
		if _, err := s.stop(ctx, &cmlv1.StopRequest{NameOrUuid: r.NameOrUuid}); err != nil {
			return nil, fmt.Errorf("wipe: stop first: %w", err)
		}
	}
	c, err := s.Containers.Wipe(ctx, r.GetNameOrUuid(), r.GetPin())
	if err != nil {
		return nil, err
	}
	_, _, _, cfg, _, _ := s.Containers.ContainerDir(r.GetNameOrUuid())
	return &cmlv1.WipeResponse{Container: c, Note: proto.String(storageWipeNote(cfg.GetTokenType()))}, nil
}

func (s *Server) stop(ctx context.Context, r *cmlv1.StopRequest) (*cmlv1.Container, error) {
	if r.GetTimeoutSeconds() > 3600 {
		return nil, errdefs.InvalidArgument("stop timeout %d s is over 3600", r.GetTimeoutSeconds())
	}
	return s.Containers.Stop(ctx, r.GetNameOrUuid(), time.Duration(r.GetTimeoutSeconds())*time.Second)
}

func (s *Server) Kill(ctx context.Context, r *cmlv1.KillRequest) (*cmlv1.Empty, error) {
	sig := syscall.Signal(r.GetSignal())
	if sig == 0 {
		sig = syscall.SIGKILL
	}
	return &cmlv1.Empty{}, s.Containers.Kill(ctx, r.GetNameOrUuid(), sig)
}

func (s *Server) State(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.Container, error) {
	c, err := s.Containers.State(r.GetNameOrUuid())
	if err == nil {
		s.storageInfo(c)
	}
	return c, err
}

func (s *Server) Config(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.ContainerConfig, error) {
	return s.Containers.Config(r.GetNameOrUuid())
}

func (s *Server) UpdateConfig(ctx context.Context, r *cmlv1.UpdateConfigRequest) (*cmlv1.Container, error) {
	f, err := configFile("update-config", r.GetSource(), r.GetConfig(), r.GetConfigText(), r.GetSignature(), r.GetCertificate())
	if err != nil {
		return nil, err
	}
	ct, err := s.Containers.UpdateConfig(ctx, r.GetNameOrUuid(), f)
	if err == nil {
		s.collectGuestOS(ctx)
	}
	return ct, err
}

func (s *Server) Freeze(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.Container, error) {
	return s.Containers.Freeze(ctx, r.GetNameOrUuid())
}

func (s *Server) Unfreeze(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.Container, error) {
	return s.Containers.Unfreeze(ctx, r.GetNameOrUuid())
}

func (s *Server) GuestOSList(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.GuestOSListResponse, error) {
	gs, err := s.GuestOS.List()
	if err != nil {
		return nil, err
	}
	out := &cmlv1.GuestOSListResponse{}
	for _, g := range gs {
		out.Guestos = append(out.Guestos, s.guestOSInfo(g))
	}
	return out, nil
}

func (s *Server) guestOSInfo(g *guestos.GuestOS) *cmlv1.GuestOS {
	return &cmlv1.GuestOS{
		Name: proto.String(g.Name()), Version: proto.Uint64(g.Version()), Size: proto.Uint64(g.Size),
		UsedBy: s.Containers.GuestOSUsers(g.Name(), g.Version()), Description: proto.String(g.Config.GetDescription()),
		TrustLevel: g.Installed.Level.Enum(), Signer: proto.String(g.Installed.Signer), HighestVersion: proto.Uint64(s.GuestOS.Highest(g.Name())),
	}
}

// GuestOSInstall installs a guest OS from a directory on the device or an
// https:// URL, streaming progress. It audits itself (streams pass the
// unary interceptor by).
func (s *Server) GuestOSInstall(r *cmlv1.GuestOSInstallRequest, stream cmlv1.Control_GuestOSInstallServer) (err error) {
	ctx := stream.Context()
	if sub := subject(ctx); sub != nil {
		ctx = audit.WithSubject(ctx, *sub)
	}
	var g *guestos.GuestOS
	defer func() {
		obj := objectOf(r)
		if g != nil {
			obj = fmt.Sprintf("%s %d from %s", g.Name(), g.Version(), obj)
		}
		s.audit(ctx, "/cml.v1.Control/GuestOSInstall", obj, err)
	}()
	last := time.Time{}
	progress := func(phase string, done, total uint64) {
		if time.Since(last) < 200*time.Millisecond && done != total {
			return
		}
		last = time.Now()
		stream.Send(&cmlv1.GuestOSInstallProgress{Phase: proto.String(phase), DoneBytes: proto.Uint64(done), TotalBytes: proto.Uint64(total)})
	}
	dir := r.GetDir()
	switch {
	case r.GetUrl() != "" && dir != "":
		return errdefs.InvalidArgument("guestos install: give a directory or a URL, not both")
	case r.GetUrl() != "":
		if s.Downloads == nil {
			return errdefs.FailedPrecondition("guestos install: downloads are not configured")
		}
		if dir, err = s.Downloads.Fetch(ctx, r.GetUrl(), progress); err != nil {
			return err
		}
	case dir == "" || dir[0] != '/':
		return errdefs.InvalidArgument("guestos install: %q is not an absolute directory path", dir)
	}
	if g, err = s.GuestOS.Install(ctx, dir, progress); err != nil {
		return err
	}
	if r.GetUrl() != "" {
		s.Downloads.Done(r.GetUrl())
	}
	s.collectGuestOS(ctx)
	return stream.Send(&cmlv1.GuestOSInstallProgress{Phase: proto.String("installed"), Guestos: s.guestOSInfo(g)})
}

// collectGuestOS removes guest OS versions below the highest installed of
// their name that no container selects or runs: an update keeps the older
// version exactly as long as somebody uses it.
func (s *Server) collectGuestOS(ctx context.Context) {
	gs, err := s.GuestOS.List()
	if err != nil {
		return
	}
	highest := map[string]uint64{}
	for _, g := range gs {
		highest[g.Name()] = max(highest[g.Name()], g.Version())
	}
	for _, g := range gs {
		if g.Version() == highest[g.Name()] || len(s.Containers.GuestOSUsers(g.Name(), g.Version())) > 0 {
			continue
		}
		err := s.GuestOS.Remove(g.Name(), g.Version())
		e := audit.Event{Type: "guestos", Operation: "guestos.collect", Object: fmt.Sprintf("%s %d", g.Name(), g.Version()), Outcome: audit.Success, Reason: "superseded and unused"}
		if err != nil {
			e.Outcome, e.Reason = audit.Failure, err.Error()
		}
		s.Audit.Record(ctx, e)
	}
}

func caInfo(c trust.CA) *cmlv1.CA {
	return &cmlv1.CA{Fingerprint: proto.String(c.Fingerprint), Subject: proto.String(c.Subject), NotAfterUnix: proto.Int64(c.NotAfter.Unix()), Vendor: proto.Bool(c.Vendor)}
}

func (s *Server) CAList(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.CAListResponse, error) {
	out := &cmlv1.CAListResponse{}
	for _, c := range s.Trust.List() {
		out.Cas = append(out.Cas, caInfo(c))
	}
	return out, nil
}

func (s *Server) CARegister(ctx context.Context, r *cmlv1.CARegisterRequest) (*cmlv1.CA, error) {
	c, err := s.Trust.AddOwnerCA(r.GetPem())
	if err != nil {
		return nil, err
	}
	return caInfo(c), nil
}

func (s *Server) CARemove(ctx context.Context, r *cmlv1.CARemoveRequest) (*cmlv1.CA, error) {
	c, err := s.Trust.RemoveOwnerCA(r.GetFingerprint())
	if err != nil {
		return nil, err
	}
	return caInfo(c), nil
}

func (s *Server) CRLLoad(ctx context.Context, r *cmlv1.CRLLoadRequest) (*cmlv1.CRLLoadResponse, error) {
	c, err := s.Trust.AddCRL(r.GetPem(), r.GetIssuerChain())
	if err != nil {
		return nil, err
	}
	return &cmlv1.CRLLoadResponse{Issuer: proto.String(c.Issuer), Revoked: proto.Uint32(uint32(c.Revoked))}, nil
}

func crlInfo(c trust.CRL) *cmlv1.CRL {
	return &cmlv1.CRL{Issuer: proto.String(c.Issuer), Number: proto.String(c.Number), ThisUpdateUnix: proto.Int64(c.ThisUpdate.Unix()),
		NextUpdateUnix: proto.Int64(c.NextUpdate.Unix()), Revoked: proto.Uint32(uint32(c.Revoked)), Fingerprint: proto.String(c.Fingerprint)}
}

func (s *Server) CRLList(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.CRLListResponse, error) {
	out := &cmlv1.CRLListResponse{}
	for _, c := range s.Trust.CRLs() {
		out.Crls = append(out.Crls, crlInfo(c))
	}
	return out, nil
}

// CRLRemove deletes a stored CRL (audited like every management call: it
// can un-revoke certificates).
func (s *Server) CRLRemove(ctx context.Context, r *cmlv1.CRLRemoveRequest) (*cmlv1.CRL, error) {
	c, err := s.Trust.RemoveCRL(r.GetRef())
	if err != nil {
		return nil, err
	}
	return crlInfo(c), nil
}

func (s *Server) DeviceInfo(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.DeviceIdentity, error) {
	return s.Device.Info(), nil
}

func (s *Server) DeviceCSR(ctx context.Context, r *cmlv1.DeviceCSRRequest) (*cmlv1.DeviceCSRResponse, error) {
	b, err := s.Device.CSR(r.GetKey())
	if err != nil {
		return nil, err
	}
	return &cmlv1.DeviceCSRResponse{Pem: b}, nil
}

func (s *Server) DeviceCert(ctx context.Context, r *cmlv1.DeviceCertRequest) (*cmlv1.DeviceIdentity, error) {
	if err := s.Device.InstallCert(ctx, r.GetPem(), r.GetReplace()); err != nil {
		return nil, err
	}
	return s.Device.Info(), nil
}

func (s *Server) DeviceProvisioned(ctx context.Context, _ *cmlv1.Empty) (*cmlv1.DeviceIdentity, error) {
	if err := s.Device.Provisioned(ctx); err != nil {
		return nil, err
	}
	return s.Device.Info(), nil
}

func (s *Server) Attest(ctx context.Context, r *cmlv1.AttestRequest) (*cmlv1.Attestation, error) {
	return s.Device.Attest(r.GetNonce(), r.GetPcrs())
}

// NetworkReporter reads containers' networks back from the kernel.
type NetworkReporter interface {
	Settings() *cmlv1.NetworkSettings
	Running() []string
	Report(id string) (*cmlv1.ContainerNetwork, error)
}

func (s *Server) Network(ctx context.Context, r *cmlv1.NetworkRequest) (*cmlv1.NetworkReport, error) {
	if s.Networks == nil {
		return nil, errdefs.FailedPrecondition("network separation is not available on this device")
	}
	rep := &cmlv1.NetworkReport{Settings: s.Networks.Settings()}
	var ids []string
	if ref := r.GetContainer(); ref != "" {
		st, err := s.Containers.State(ref)
		if err != nil {
			return nil, err
		}
		ids = []string{st.GetUuid()}
	} else {
		ids = s.Networks.Running()
	}
	for _, id := range ids {
		cn, err := s.Networks.Report(id)
		if err != nil {
			if r.GetContainer() == "" && errors.Is(err, errdefs.ErrNotFound) {
				continue // stopped meanwhile
			}
			return nil, err
		}
		rep.Containers = append(rep.Containers, cn)
	}
	sort.Slice(rep.Containers, func(i, j int) bool { return rep.Containers[i].GetName() < rep.Containers[j].GetName() })
	return rep, nil
}

func (s *Server) GuestOSRemove(ctx context.Context, r *cmlv1.GuestOSRemoveRequest) (*cmlv1.Empty, error) {
	if users := s.Containers.GuestOSUsers(r.GetName(), r.GetVersion()); len(users) > 0 {
		return nil, errdefs.FailedPrecondition("guestos %s %d is used by container(s) %s", r.GetName(), r.GetVersion(), strings.Join(users, ", "))
	}
	return &cmlv1.Empty{}, s.GuestOS.Remove(r.GetName(), r.GetVersion())
}

func (s *Server) Stop(ctx context.Context, r *cmlv1.StopRequest) (*cmlv1.Container, error) {
	ct, err := s.stop(ctx, r)
	if err == nil {
		s.collectGuestOS(ctx)
	}
	return ct, err
}

func (s *Server) Logs(r *cmlv1.LogsRequest, stream cmlv1.Control_LogsServer) error {
	ctx := stream.Context()
	err := s.Containers.Logs(ctx, r.GetNameOrUuid(), r.GetFollow(), func(b []byte) error {
		return stream.Send(&cmlv1.LogsResponse{Data: b})
	})
	s.audit(ctx, "/cml.v1.Control/Logs", r.GetNameOrUuid(), err)
	return err
}

func (s *Server) Events(r *cmlv1.EventsRequest, stream cmlv1.Control_EventsServer) error {
	ch, cancel := s.Containers.Subscribe()
	defer cancel()
	want := func(c *cmlv1.Container) bool {
		ref := r.GetNameOrUuid()
		return ref == "" || c.GetName() == ref || c.GetUuid() == ref
	}
	if ref := r.GetNameOrUuid(); ref != "" {
		if _, err := s.Containers.State(ref); err != nil {
			return err
		}
	}
	// Current state first, so a client needs no separate list call.
	for _, c := range s.Containers.List() {
		if want(c) {
			if err := stream.Send(&cmlv1.Event{TimeUnixNano: proto.Int64(time.Now().UnixNano()), Container: c}); err != nil {
				return err
			}
		}
	}
	for {
		select {
		case <-stream.Context().Done():
			return nil
		case e, ok := <-ch:
			if !ok {
				return status.Error(codes.ResourceExhausted, "events: client fell too far behind; subscribe again")
			}
			if want(e.GetContainer()) {
				if err := stream.Send(e); err != nil {
					return err
				}
			}
		}
	}
}

// Exec runs a process in a container, streaming its standard I/O.
func (s *Server) Exec(stream cmlv1.Control_ExecServer) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	// After the first message: the stream is authorized then, and its
	// context ends with the caller's session.
	ctx := stream.Context()
	start := first.GetStart()
	if start == nil {
		return errdefs.InvalidArgument("exec: the first message must be start")
	}
	code, err := s.exec(ctx, stream, start)
	// The outcome is the real one: a process the runtime could not start
	// is a failure, and a process that ran has its exit code recorded.
	e := audit.Event{Type: "management", Operation: operationOf("/cml.v1.Control/Exec"), Subject: subject(ctx), Object: objectOf(start), Outcome: audit.Success}
	if err != nil {
		e.Outcome, e.Reason = audit.Failure, reasonOf(err)
	} else {
		e.ExitCode = &code
	}
	if aerr := s.Audit.Record(ctx, e); aerr != nil {
		s.auditBroken.Store(true)
		s.Log.Error("audit record failed", "operation", e.Operation, "err", aerr)
	}
	if err != nil {
		return err
	}
	return stream.Send(&cmlv1.ExecResponse{Msg: &cmlv1.ExecResponse_ExitStatus{ExitStatus: int32(code)}})
}

// streamWriter sends output to the exec stream; sends are serialized.
type streamWriter struct {
	mu     *sync.Mutex
	stream cmlv1.Control_ExecServer
	stderr bool
}

func (w streamWriter) Write(p []byte) (int, error) {
	b := append([]byte(nil), p...)
	m := &cmlv1.ExecResponse{Msg: &cmlv1.ExecResponse_Stdout{Stdout: b}}
	if w.stderr {
		m = &cmlv1.ExecResponse{Msg: &cmlv1.ExecResponse_Stderr{Stderr: b}}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.stream.Send(m); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (s *Server) exec(ctx context.Context, stream cmlv1.Control_ExecServer, start *cmlv1.ExecStart) (int, error) {
	var mu sync.Mutex
	opts := container.ExecOptions{Args: start.GetArgs(), Env: start.GetEnv()}
	// stdin is a real pipe so the process, not a copy goroutine, owns it.
	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		return -1, err
	}
	defer stdinR.Close()
	defer stdinW.Close()
	var stdin io.Writer = stdinW
	var ptmx, tty *os.File
	outDone := make(chan struct{})
	if start.GetTty() {
		ptmx, tty, err = pty.Open()
		if err != nil {
			return -1, fmt.Errorf("exec: allocate terminal: %w", err)
		}
		defer ptmx.Close()
		// The terminal cmld allocates only carries bytes to runc, which
		// makes the container's own terminal: raw, so it neither echoes
		// nor translates anything itself (echo of a NUL runc writes at
		// start showed as a stray "^@").
		if _, err := term.MakeRaw(int(tty.Fd())); err != nil {
			tty.Close()
			return -1, fmt.Errorf("exec: terminal: %w", err)
		}
		// A client without a terminal of its own sends no size: give the
		// classic 24x80 rather than 0x0, which makes stty and editors fail.
		rows, cols := uint16(24), uint16(80)
		if start.GetRows() > 0 && start.GetCols() > 0 {
			rows, cols = uint16(start.GetRows()), uint16(start.GetCols())
		}
		pty.Setsize(ptmx, &pty.Winsize{Rows: rows, Cols: cols})
		stdin = ptmx
		opts.IO = oci.ExecIO{Stdin: tty, Stdout: tty, Stderr: tty, TTY: true}
		opts.Rows, opts.Cols = uint(rows), uint(cols)
		go func() {
			defer close(outDone)
			io.Copy(streamWriter{mu: &mu, stream: stream}, ptmx)
		}()
	} else {
		opts.IO = oci.ExecIO{Stdin: stdinR, Stdout: streamWriter{mu: &mu, stream: stream}, Stderr: streamWriter{mu: &mu, stream: stream, stderr: true}}
		close(outDone)
	}
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				return
			}
			switch {
			case m.GetStdin() != nil:
				stdin.Write(m.GetStdin())
			case m.GetStdinEof():
				if ptmx != nil {
					ptmx.Write([]byte{4}) // ^D
				} else {
					stdinW.Close()
				}
			case m.GetResize() != nil && ptmx != nil:
				pty.Setsize(ptmx, &pty.Winsize{Rows: uint16(m.GetResize().GetRows()), Cols: uint16(m.GetResize().GetCols())})
			}
		}
	}()
	code, err := s.Containers.Exec(ctx, start.GetNameOrUuid(), opts)
	if tty != nil {
		tty.Close()
		select {
		case <-outDone:
		case <-time.After(2 * time.Second):
		}
	}
	return code, err
}

// DeviceWipe returns the device to the state before any container
// existed: every container is stopped and removed, an encrypted one's key
// destroyed in its token first. The wipe is audited before it starts (the
// interceptor refuses it when the trail cannot record it).
func (s *Server) DeviceWipe(ctx context.Context, r *cmlv1.DeviceWipeRequest) (*cmlv1.DeviceWipeResponse, error) {
	if err := s.Audit.Record(ctx, audit.Event{Type: "device", Operation: "device.wipe", Subject: audit.SubjectFrom(ctx), Outcome: audit.Success, Reason: "started: every container is stopped and removed"}); err != nil {
		return nil, err
	}
	out := &cmlv1.DeviceWipeResponse{}
	soft := false
	for _, c := range s.Containers.List() {
		switch c.GetState() {
		case cmlv1.ContainerState_STOPPED, cmlv1.ContainerState_FAILED:
		default:
			if _, err := s.stop(ctx, &cmlv1.StopRequest{NameOrUuid: c.Uuid}); err != nil {
				return out, fmt.Errorf("device wipe: stop %s: %w", c.GetName(), err)
			}
		}
		if _, _, _, cfg, _, err := s.Containers.ContainerDir(c.GetUuid()); err == nil && cfg.GetTokenType() == cmlv1.ContainerTokenType_SOFT {
			soft = true
		}
		if err := s.Containers.Remove(ctx, c.GetUuid(), r.GetPin()); err != nil {
			return out, fmt.Errorf("device wipe: remove %s: %w", c.GetName(), err)
		}
		out.Removed = append(out.Removed, c.GetName())
	}
	s.collectGuestOS(ctx)
	note := "every container and its data is gone; keys in PKCS#11 and TPM tokens were destroyed"
	if soft {
		note += "; " + storageWipeNote(cmlv1.ContainerTokenType_SOFT)
	}
	out.Note = proto.String(note)
	s.Audit.Record(ctx, audit.Event{Type: "device", Operation: "device.wipe", Subject: audit.SubjectFrom(ctx), Outcome: audit.Success, Reason: fmt.Sprintf("done: %d containers removed", len(out.Removed))})
	return out, nil
}

// ownOnly narrows a List to a pure user's own containers.
func (s *Server) ownOnly(ctx context.Context, l *cmlv1.ListResponse) {
	a := s.account(ctx)
	if a == nil || a.Has(access.Administrator) || a.Has(access.Auditor) {
		return
	}
	var keep []*cmlv1.Container
	for _, c := range l.Containers {
		if slices.Contains(a.Containers, c.GetName()) {
			keep = append(keep, c)
		}
	}
	l.Containers = keep
}

// storageWipeNote says what a wipe cannot promise for a token type.
func storageWipeNote(t cmlv1.ContainerTokenType) string {
	switch t {
	case cmlv1.ContainerTokenType_SOFT:
		return "soft token: the wrapped key file was deleted, but a copy taken earlier (a backup, a disk image) still opens with the PIN; only PKCS#11 and TPM tokens destroy the key itself"
	case cmlv1.ContainerTokenType_NONE:
		return "the container's data was not encrypted: it was deleted, not crypto-erased"
	}
	return "the key was destroyed in the token: no copy of the wrapped key can be unwrapped again"
}
