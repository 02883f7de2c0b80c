package api

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/access"
)

type pki struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newPKI(t *testing.T) *pki {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "owner"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return &pki{c, k, pool}
}

func (p *pki) issue(t *testing.T, cn string, usage x509.ExtKeyUsage) tls.Certificate {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	n, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: n, Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature, DNSNames: []string{"device"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, k.Public(), p.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}
}

// TestRemoteClientsAtOnce: several remote clients over mutual TLS log
// in, call, and have sessions ended at once, while others guess one
// account's password (under -race): every session works from its own
// certificate only, an ended session's next call is Unauthenticated, the
// guessed account ends locked and then refuses its right password.
func TestRemoteClientsAtOnce(t *testing.T) {
	s, _, _ := newServer()
	accs, err := access.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	pol := accs.Policy()
	pol.MaxFailures = 3
	if err := accs.SetPolicy(pol); err != nil {
		t.Fatal(err)
	}
	s.Accounts, s.Sessions = accs, access.NewSessions(func() time.Duration { return time.Hour })
	ca := newPKI(t)
	const clients = 6
	pw := []byte("Remote-Passw0rd!")
	local := access.Principal{Local: true}
	for i := 0; i < clients; i++ {
		name := fmt.Sprintf("op%d", i)
		if err := accs.Add(access.Account{Name: name, Roles: []access.Role{access.Auditor}, CertNames: []string{name}}, nil); err != nil {
			t.Fatal(err)
		}
		if err := accs.ChangePassword(local, name, nil, pw); err != nil {
			t.Fatal(err)
		}
	}
	accs.Add(access.Account{Name: "boss", Roles: []access.Role{access.Administrator}, CertNames: []string{"boss"}}, nil)
	accs.Add(access.Account{Name: "victim", Roles: []access.Role{access.Administrator}, CertNames: []string{"guess0", "guess1"}}, nil)
	accs.ChangePassword(local, "victim", nil, pw)

	srvCert := ca.issue(t, "device", x509.ExtKeyUsageServerAuth)
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{srvCert}, ClientCAs: ca.pool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13})),
		grpc.ChainUnaryInterceptor(s.UnaryInterceptor), grpc.ChainStreamInterceptor(s.StreamInterceptor))
	cmlv1.RegisterControlServer(gs, s)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(lis)
	defer gs.Stop()
	dial := func(cn string) cmlv1.ControlClient {
		tc := &tls.Config{Certificates: []tls.Certificate{ca.issue(t, cn, x509.ExtKeyUsageClientAuth)}, RootCAs: ca.pool, ServerName: "device", MinVersion: tls.VersionTLS13}
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(tc)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return cmlv1.NewControlClient(conn)
	}
	boss := dial("boss")
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			name := fmt.Sprintf("op%d", i)
			c := dial(name)
			resp, err := c.Login(ctx, &cmlv1.LoginRequest{Password: proto.String(string(pw))})
			if err != nil {
				errs <- fmt.Errorf("%s login: %v", name, err)
				return
			}
			sctx := metadata.AppendToOutgoingContext(ctx, SessionMetadata, resp.GetToken())
			for j := 0; j < 10; j++ {
				me, err := c.Whoami(sctx, &cmlv1.Empty{})
				if err != nil || me.GetName() != name {
					errs <- fmt.Errorf("%s whoami: %v %v", name, me.GetName(), err)
					return
				}
				c.SessionList(sctx, &cmlv1.SessionListRequest{})
			}
			// The token with another client's certificate is nothing.
			if _, err := boss.Whoami(metadata.AppendToOutgoingContext(ctx, SessionMetadata, resp.GetToken()), &cmlv1.Empty{}); status.Code(err) != codes.Unauthenticated {
				errs <- fmt.Errorf("%s's token from another certificate: %v", name, err)
			}
			if i%2 == 0 {
				if _, err := boss.SessionEnd(ctx, &cmlv1.SessionRef{Id: proto.String(resp.GetSession().GetId())}); err != nil {
					errs <- fmt.Errorf("end %s's session: %v", name, err)
					return
				}
				if _, err := c.Whoami(sctx, &cmlv1.Empty{}); status.Code(err) != codes.Unauthenticated {
					errs <- fmt.Errorf("%s after its session ended: %v", name, err)
				}
			}
		}(i)
	}
	for g := 0; g < 2; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			c := dial(fmt.Sprintf("guess%d", g))
			for k := 0; k < 3; k++ {
				if _, err := c.Login(ctx, &cmlv1.LoginRequest{Password: proto.String(fmt.Sprintf("Wrong-Guess-%d%d", g, k))}); status.Code(err) != codes.Unauthenticated {
					errs <- fmt.Errorf("a wrong guess: %v", err)
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if v, _ := accs.Get("victim"); !v.Locked {
		t.Errorf("6 wrong guesses at once did not lock the account (max 3): %+v", v.Public())
	}
	if _, err := dial("guess0").Login(ctx, &cmlv1.LoginRequest{Password: proto.String(string(pw))}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("the right password on the locked account: %v", err)
	}
	if n := len(s.Sessions.List("")); n != clients/2 {
		t.Errorf("%d sessions left, want %d", n, clients/2)
	}
}
