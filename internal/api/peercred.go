package api

import (
	"context"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/cmlproject/cml/internal/audit"
)

// PeerCred is the AuthInfo of a control socket connection: the kernel's
// word (SO_PEERCRED) on who connected, which the client cannot forge.
type PeerCred struct{ UID, GID, PID int32 }

// AuthType implements credentials.AuthInfo.
func (PeerCred) AuthType() string { return "peercred" }

// peerCreds reads SO_PEERCRED in the server handshake of a unix socket.
type peerCreds struct{}

// PeerCredentials returns server transport credentials that attach the
// caller's uid, gid and pid to every request on a unix socket.
func PeerCredentials() credentials.TransportCredentials { return peerCreds{} }

func (peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return nil, nil, fmt.Errorf("control socket: not a unix connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, nil, err
	}
	if cerr != nil {
		return nil, nil, fmt.Errorf("control socket: peer credentials: %w", cerr)
	}
	return conn, PeerCred{UID: int32(cred.Uid), GID: int32(cred.Gid), PID: cred.Pid}, nil
}

func (peerCreds) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, nil, nil
}
func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}
func (peerCreds) Clone() credentials.TransportCredentials { return peerCreds{} }
func (peerCreds) OverrideServerName(string) error         { return nil }

// subject returns the audit subject of the request in ctx.
func subject(ctx context.Context) *audit.Subject {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil
	}
	if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
		// A remote caller: no local ids; its client certificate's subject
		// (CR 2.12).
		if cs := ti.State.PeerCertificates; len(cs) > 0 {
			return &audit.Subject{UID: -1, GID: -1, Certificate: cs[0].Subject.String(), Remote: p.Addr.String()}
		}
		return nil
	}
	pc, ok := p.AuthInfo.(PeerCred)
	if !ok {
		return nil
	}
	return &audit.Subject{UID: pc.UID, GID: pc.GID, PID: pc.PID}
}
