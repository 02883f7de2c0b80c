package api

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/audittest"
	"github.com/cmlproject/cml/internal/errdefs"
	"github.com/cmlproject/cml/internal/oci"
)

func newServer() (*Server, *audittest.Recorder, *bytes.Buffer) {
	a := &audittest.Recorder{}
	var log bytes.Buffer
	return &Server{Audit: a, Log: slog.New(slog.NewTextHandler(&log, nil))}, a, &log
}

func TestErrorClassesMapToCodes(t *testing.T) {
	s, _, log := newServer()
	for _, tc := range []struct {
		err  error
		code codes.Code
	}{
		{errdefs.NotFound("container %q does not exist", "x"), codes.NotFound},
		{errdefs.AlreadyExists("x"), codes.AlreadyExists},
		{errdefs.InvalidArgument("x"), codes.InvalidArgument},
		{errdefs.PermissionDenied("x"), codes.PermissionDenied},
		{errdefs.FailedPrecondition("x"), codes.FailedPrecondition},
		{errdefs.Integrity("x"), codes.DataLoss},
		{errdefs.Unavailable("x"), codes.Unavailable},
		// Chains keep their class through wrapping.
		{fmt.Errorf("container a: %w", context.Canceled), codes.Canceled},
		{fmt.Errorf("container a: runc kill: %w", oci.ErrNotExist), codes.NotFound},
		{fmt.Errorf("container a: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{errors.New("open /var/lib/cml/containers/x/config.conf: permission denied"), codes.Internal},
	} {
		st, _ := status.FromError(s.toStatus(tc.err))
		if st.Code() != tc.code {
			t.Errorf("%v: %s, want %s", tc.err, st.Code(), tc.code)
		}
		if tc.code != codes.Internal && st.Message() != tc.err.Error() {
			t.Errorf("%v: message %q changed", tc.err, st.Message())
		}
	}
	// Internal: no host path to the client; the detail is in the log.
	st, _ := status.FromError(s.toStatus(errors.New("open /var/lib/cml/secret: EIO")))
	if strings.Contains(st.Message(), "/var/lib") || !strings.Contains(st.Message(), "reference") {
		t.Errorf("internal error message %q", st.Message())
	}
	if !strings.Contains(log.String(), "/var/lib/cml/secret") {
		t.Error("internal error detail not logged")
	}
}

func call(s *Server, ctx context.Context, method string, req any, h grpc.UnaryHandler) error {
	_, err := s.UnaryInterceptor(ctx, req, &grpc.UnaryServerInfo{FullMethod: method}, h)
	return err
}

// The audit record of a refused call carries the error's own text, not
// the transport's rendering ("rpc error: code = ...").
func TestInterceptorAuditsPlainReasons(t *testing.T) {
	s, a, _ := newServer()
	ref := &cmlv1.ContainerRef{NameOrUuid: ptr("web")}
	call(s, context.Background(), "/cml.v1.Control/Start", ref, func(context.Context, any) (any, error) {
		return nil, errdefs.FailedPrecondition("container web is RUNNING")
	})
	if len(a.Events()) != 1 {
		t.Fatalf("%d records", len(a.Events()))
	}
	e := a.Events()[0]
	if e.Operation != "control.Start" || e.Object != "web" || e.Outcome != audit.Failure || e.Reason != "container web is RUNNING" {
		t.Errorf("record %+v", e)
	}
	// Queries are not audited.
	call(s, context.Background(), "/cml.v1.Control/List", &cmlv1.ListRequest{}, func(context.Context, any) (any, error) { return nil, nil })
	if len(a.Events()) != 1 {
		t.Error("a query was audited")
	}
}

// Bug 10 at the API edge: with the audit trail unwritable, a call that
// was carried out says so, and later management calls are refused without
// running until a record can be written again.
func TestInterceptorFailsClosedOnAudit(t *testing.T) {
	s, a, _ := newServer()
	a.Fail(errors.New("no space left on device"))
	ran := 0
	h := func(context.Context, any) (any, error) { ran++; return &cmlv1.Empty{}, nil }
	ref := &cmlv1.ContainerRef{NameOrUuid: ptr("web")}
	err := call(s, context.Background(), "/cml.v1.Control/Stop", ref, h)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "could not be recorded") {
		t.Errorf("unrecorded call: %v", err)
	}
	err = call(s, context.Background(), "/cml.v1.Control/Remove", ref, h)
	if status.Code(err) != codes.Unavailable || ran != 1 {
		t.Errorf("call with a broken trail: %v (handler ran %d times)", err, ran)
	}
	// Reads go on.
	if err := call(s, context.Background(), "/cml.v1.Control/State", ref, h); err != nil {
		t.Errorf("query refused: %v", err)
	}
	a.Fail(nil)
	if err := call(s, context.Background(), "/cml.v1.Control/Remove", ref, h); err != nil {
		t.Errorf("after the trail recovered: %v", err)
	}
	if a.Events()[0].Outcome != "requested" {
		t.Errorf("recovery record %+v", a.Events()[0])
	}
}

func ptr[T any](v T) *T { return &v }
