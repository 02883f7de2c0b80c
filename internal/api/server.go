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
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/container"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/guestos"
	"github.com/cmlproject/cml/internal/oci"
)

// Server implements cmlv1.ControlServer.
type Server struct {
	cmlv1.UnimplementedControlServer
	Containers *container.Manager
	GuestOS    *guestos.Store
	Audit      audit.Recorder
	Log        *slog.Logger
}

// queries are read-only status calls, not audited (they would flood the
// trail with every poll of a status display).
var queries = map[string]bool{
	"/cml.v1.Control/List": true, "/cml.v1.Control/State": true,
	"/cml.v1.Control/GuestOSList": true, "/cml.v1.Control/Events": true,
}

// objectOf names what a request acts on, for the audit record.
func objectOf(req any) string {
	switch r := req.(type) {
	case *cmlv1.ContainerRef:
		return r.GetNameOrUuid()
	case *cmlv1.StopRequest:
		return r.GetNameOrUuid()
	case *cmlv1.KillRequest:
		return fmt.Sprintf("%s signal %d", r.GetNameOrUuid(), r.GetSignal())
	case *cmlv1.UpdateConfigRequest:
		return r.GetNameOrUuid()
	case *cmlv1.CreateRequest:
		return r.GetConfig().GetName()
	case *cmlv1.LogsRequest:
		return r.GetNameOrUuid()
	case *cmlv1.GuestOSInstallRequest:
		return r.GetDir()
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

func (s *Server) audit(ctx context.Context, method string, object string, err error) {
	e := audit.Event{Type: "management", Operation: operationOf(method), Subject: subject(ctx), Object: object, Outcome: audit.Success}
	if err != nil {
		e.Outcome = audit.Failure
		e.Reason = err.Error()
	}
	if aerr := s.Audit.Record(ctx, e); aerr != nil {
		s.Log.Error("audit record failed", "operation", e.Operation, "err", aerr)
	}
}

// UnaryInterceptor audits each management call and maps its error.
func (s *Server) UnaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if sub := subject(ctx); sub != nil {
		ctx = audit.WithSubject(ctx, *sub)
	}
	resp, err := h(ctx, req)
	err = toStatus(err)
	if !queries[info.FullMethod] {
		s.audit(ctx, info.FullMethod, objectOf(req), err)
	}
	return resp, err
}

// StreamInterceptor maps stream errors; streams audit themselves once they
// know their object.
func (s *Server) StreamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	return toStatus(h(srv, ss))
}

func (s *Server) List(ctx context.Context, _ *cmlv1.ListRequest) (*cmlv1.ListResponse, error) {
	return &cmlv1.ListResponse{Containers: s.Containers.List()}, nil
}

func (s *Server) Create(ctx context.Context, r *cmlv1.CreateRequest) (*cmlv1.Container, error) {
	if r.GetConfig() == nil {
		return nil, errdefs.InvalidArgument("create: no config")
	}
	src := r.GetSource()
	if src == "" {
		src = "config"
	}
	return s.Containers.Create(ctx, r.GetConfig(), src)
}

func (s *Server) Remove(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.Empty, error) {
	return &cmlv1.Empty{}, s.Containers.Remove(ctx, r.GetNameOrUuid())
}

func (s *Server) Start(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.Container, error) {
	return s.Containers.Start(ctx, r.GetNameOrUuid())
}

func (s *Server) Stop(ctx context.Context, r *cmlv1.StopRequest) (*cmlv1.Container, error) {
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
	return s.Containers.State(r.GetNameOrUuid())
}

func (s *Server) Config(ctx context.Context, r *cmlv1.ContainerRef) (*cmlv1.ContainerConfig, error) {
	return s.Containers.Config(r.GetNameOrUuid())
}

func (s *Server) UpdateConfig(ctx context.Context, r *cmlv1.UpdateConfigRequest) (*cmlv1.Container, error) {
	if r.GetConfig() == nil {
		return nil, errdefs.InvalidArgument("update-config: no config")
	}
	return s.Containers.UpdateConfig(ctx, r.GetNameOrUuid(), r.GetConfig())
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
	}
}

func (s *Server) GuestOSInstall(ctx context.Context, r *cmlv1.GuestOSInstallRequest) (*cmlv1.GuestOS, error) {
	if r.GetDir() == "" || r.GetDir()[0] != '/' {
		return nil, errdefs.InvalidArgument("guestos install: %q is not an absolute directory path", r.GetDir())
	}
	g, err := s.GuestOS.Install(ctx, r.GetDir())
	if err != nil {
		return nil, err
	}
	return s.guestOSInfo(g), nil
}

func (s *Server) GuestOSRemove(ctx context.Context, r *cmlv1.GuestOSRemoveRequest) (*cmlv1.Empty, error) {
	if users := s.Containers.GuestOSUsers(r.GetName(), r.GetVersion()); len(users) > 0 {
		return nil, errdefs.FailedPrecondition("guestos %s %d is used by container(s) %s", r.GetName(), r.GetVersion(), strings.Join(users, ", "))
	}
	return &cmlv1.Empty{}, s.GuestOS.Remove(r.GetName(), r.GetVersion())
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
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	start := first.GetStart()
	if start == nil {
		return errdefs.InvalidArgument("exec: the first message must be start")
	}
	code, err := s.exec(ctx, stream, start)
	s.audit(ctx, "/cml.v1.Control/Exec", objectOf(start), err)
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
		if start.GetRows() > 0 && start.GetCols() > 0 {
			pty.Setsize(ptmx, &pty.Winsize{Rows: uint16(start.GetRows()), Cols: uint16(start.GetCols())})
		}
		stdin = ptmx
		opts.IO = oci.ExecIO{Stdin: tty, Stdout: tty, Stderr: tty, TTY: true}
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
