// Package errdefs defines the small set of error classes CML uses across
// packages. Callers test a class with errors.Is; the API edge maps each class
// to one gRPC status code. It does not define messages: each error carries
// its own one-line text.
package errdefs

import (
	"errors"
	"fmt"
)

// The error classes.
var (
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrPermissionDenied   = errors.New("permission denied")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrIntegrity          = errors.New("integrity violation")
	ErrUnavailable        = errors.New("unavailable")
	// ErrUnauthenticated: the caller is not (or no longer) authenticated
	// (no login, a locked or ended session).
	ErrUnauthenticated = errors.New("unauthenticated")
)

// classed is an error whose text is its own message and whose class is
// reported through Is, so the class name does not clutter the message.
type classed struct {
	class error
	msg   string
	cause error
}

func (e *classed) Error() string {
	if e.cause != nil {
		return e.msg + ": " + e.cause.Error()
	}
	return e.msg
}

func (e *classed) Is(target error) bool { return target == e.class }
func (e *classed) Unwrap() error        { return e.cause }

func newf(class error, format string, args ...any) error {
	return &classed{class: class, msg: fmt.Sprintf(format, args...)}
}

// NotFound returns an error of class ErrNotFound.
func NotFound(format string, args ...any) error { return newf(ErrNotFound, format, args...) }

// AlreadyExists returns an error of class ErrAlreadyExists.
func AlreadyExists(format string, args ...any) error {
	return newf(ErrAlreadyExists, format, args...)
}

// InvalidArgument returns an error of class ErrInvalidArgument.
func InvalidArgument(format string, args ...any) error {
	return newf(ErrInvalidArgument, format, args...)
}

// PermissionDenied returns an error of class ErrPermissionDenied.
func PermissionDenied(format string, args ...any) error {
	return newf(ErrPermissionDenied, format, args...)
}

// FailedPrecondition returns an error of class ErrFailedPrecondition.
func FailedPrecondition(format string, args ...any) error {
	return newf(ErrFailedPrecondition, format, args...)
}

// Integrity returns an error of class ErrIntegrity.
func Integrity(format string, args ...any) error { return newf(ErrIntegrity, format, args...) }

// Wrap attaches class to cause with a message prefix; errors.Is finds both
// the class and whatever cause wraps.
func Wrap(class error, cause error, format string, args ...any) error {
	return &classed{class: class, msg: fmt.Sprintf(format, args...), cause: cause}
}

// Unavailable reports that a resource (a server, a device) cannot be
// reached now; retrying may help.
func Unavailable(format string, args ...any) error { return newf(ErrUnavailable, format, args...) }

// Unauthenticated returns an error of class ErrUnauthenticated.
func Unauthenticated(format string, args ...any) error {
	return newf(ErrUnauthenticated, format, args...)
}
