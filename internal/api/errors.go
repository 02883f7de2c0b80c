package api

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/errdefs"
)

// reasonOf is an error's text for an audit record or a log: its own
// message, not a transport's rendering of it.
func reasonOf(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Message()
	}
	return err.Error()
}

// toStatus maps an error class to its gRPC code; the one place this
// happens. The message is the error's one-line text, except for errors of
// no class (Internal): their detail (host paths, system errors) goes to
// the log under a reference, and the client gets the reference only.
func (s *Server) toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, errdefs.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, errdefs.ErrAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, errdefs.ErrInvalidArgument):
		code = codes.InvalidArgument
	case errors.Is(err, errdefs.ErrPermissionDenied):
		code = codes.PermissionDenied
	case errors.Is(err, errdefs.ErrUnauthenticated):
		code = codes.Unauthenticated
	case errors.Is(err, errdefs.ErrFailedPrecondition):
		code = codes.FailedPrecondition
	case errors.Is(err, errdefs.ErrIntegrity):
		code = codes.DataLoss
	case errors.Is(err, errdefs.ErrUnavailable):
		code = codes.Unavailable
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	}
	if code == codes.Internal {
		ref := s.errRef.Add(1)
		s.Log.Error("internal error", "ref", ref, "err", err)
		return status.Errorf(code, "internal error (daemon log reference %d)", ref)
	}
	// A message may quote client-chosen values; none is sent back whole.
	return status.Error(code, audit.Bound(err.Error(), maxMessage))
}

// maxMessage bounds an error message sent to a client.
const maxMessage = 512
