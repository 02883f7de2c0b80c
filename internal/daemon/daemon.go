// Package daemon wires cmld together, top to bottom: state directories, the
// audit trail, the guest OS store, the OCI runtime, the container manager
// (with crash recovery and autostart), and the control socket. It is the
// only place that knows the order in which components start; it holds no
// logic of its own beyond that.
package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/netutil"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/access"
	"github.com/cmlproject/cml/internal/api"
	"github.com/cmlproject/cml/internal/atomicfile"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/backup"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/container"
	"github.com/cmlproject/cml/internal/device"
	"github.com/cmlproject/cml/internal/guestos"
	"github.com/cmlproject/cml/internal/network"
	"github.com/cmlproject/cml/internal/oci"
	"github.com/cmlproject/cml/internal/reaper"
	"github.com/cmlproject/cml/internal/storage"
	"github.com/cmlproject/cml/internal/tpm"
	"github.com/cmlproject/cml/internal/trust"
)

// Config is cmld's configuration. The zero value of each field selects the
// embedded default, so cmld runs with no config file at all.
type Config struct {
	StateDir    string // default /var/lib/cml
	RunDir      string // default /run/cml
	Socket      string // default <RunDir>/control.sock
	SocketGroup string // default "cml", used when the group exists
	Runtime     string // OCI runtime binary, default "runc"
	// DeviceConfig is the device settings file, default
	// <StateDir>/device.conf; absent means the defaults (signed configs,
	// no locally signed images, no HTTPS downloads).
	DeviceConfig string
	Log          *slog.Logger
}

// Defaults fills in the embedded defaults.
func (c *Config) Defaults() {
	if c.StateDir == "" {
		c.StateDir = "/var/lib/cml"
	}
	if c.RunDir == "" {
		c.RunDir = "/run/cml"
	}
	if c.Socket == "" {
		c.Socket = filepath.Join(c.RunDir, "control.sock")
	}
	if c.SocketGroup == "" {
		c.SocketGroup = "cml"
	}
	if c.Runtime == "" {
		c.Runtime = "runc"
	}
	if c.Log == nil {
		c.Log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
}

// Run runs the daemon until ctx ends. Containers keep running when it
// returns; the next Run re-adopts them.
func Run(ctx context.Context, c Config) error {
	c.Defaults()
	// The audit trail's HALT action ends cmld through this.
	ctx, halt := context.WithCancelCause(ctx)
	defer halt(nil)
	if os.Geteuid() != 0 {
		return errors.New("cmld must run as root (it mounts images and manages namespaces and cgroups)")
	}
	var err error
	if c.StateDir, err = filepath.Abs(c.StateDir); err != nil {
		return err
	}
	if c.RunDir, err = filepath.Abs(c.RunDir); err != nil {
		return err
	}
	for _, d := range []string{c.StateDir, c.RunDir} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return err
		}
	}
	if err := checkTraversable(c.RunDir); err != nil {
		return err
	}
	// One daemon per state directory.
	lock, err := os.OpenFile(filepath.Join(c.StateDir, "cmld.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("another cmld uses state directory %s", c.StateDir)
	}
	// Container inits are re-parented to cmld when the runtime exits, so
	// their exit status is ours to collect the moment they die.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("become subreaper: %w", err)
	}
	runtimeBin, err := exec.LookPath(c.Runtime)
	if err != nil {
		return fmt.Errorf("OCI runtime %q not found (install runc or set --runtime)", c.Runtime)
	}

	sink, err := audit.OpenFile(filepath.Join(c.StateDir, "audit.log"), nil)
	if err != nil {
		return err
	}
	if !sink.AppendOnly() {
		c.Log.Warn("audit: the state directory's filesystem cannot make the trail append-only (chattr +a)")
	}
	defer sink.Close()
	dev, err := loadDevice(c)
	if err != nil {
		return err
	}
	// The trust store's vendor CAs are provisioned into <state>/trust/vendor
	// by the installer; no API writes there.
	ts, err := trust.Open(filepath.Join(c.StateDir, "trust"))
	if err != nil {
		return err
	}
	// The TPM: the kernel's when there is one, else cmld's own swtpm with
	// its state in <state>/tpm (keys and NV survive restarts, PCRs do not).
	tpmConn, stopTPM, err := tpm.Open(ctx, filepath.Join(c.StateDir, "tpm"), c.Log)
	if err != nil {
		return fmt.Errorf("TPM: %w", err)
	}
	defer stopTPM()
	keys, err := tpm.EnsureKeys(tpmConn)
	if err != nil {
		return fmt.Errorf("TPM identity keys: %w", err)
	}
	counter, err := tpm.OpenVersions(tpmConn)
	if err != nil {
		return fmt.Errorf("TPM rollback counter: %w", err)
	}
	measurer, err := tpm.NewMeasurer(tpmConn, int(dev.GetMeasurementPcr()), filepath.Join(c.StateDir, "measurements.cel"))
	if err != nil {
		return err
	}
	ident, err := device.Open(device.Options{Dir: filepath.Join(c.StateDir, "identity"), Keys: keys, Measurer: measurer,
		TPM: tpmConn.Source, ProductName: dev.GetProductName(), Serial: dev.GetSerial(), Audit: sink})
	if err != nil {
		return err
	}
	// Checkpoints of the audit trail are signed with the device's
	// TPM-held identity key (docs/audit.md).
	if signer, err := keys.TLS.GetSigner(); err == nil {
		as := dev.GetAudit()
		sink.SetSigner(signer, "cml audit "+ident.UUID(), uint64(as.GetCheckpointEvery()), time.Duration(as.GetCheckpointIntervalSeconds())*time.Second)
		defer sink.Checkpoint() // the last one, while the TPM still answers
	} else {
		c.Log.Error("audit: no signing key: the trail gets no checkpoints", "err", err)
	}
	var fw *audit.Forwarder
	if as := dev.GetAudit(); as.GetCollector() != "" {
		if fw, err = forwarder(sink, as, keys, ident, c.Log); err != nil {
			return err
		}
		go fw.Run(ctx)
	}
	if sink.Torn != "" {
		sink.Record(ctx, audit.Event{Type: "daemon", Operation: "audit.torn", Outcome: audit.Failure,
			Reason: "the audit trail ended in an incomplete record (a crash mid-write); it was moved to " + sink.Torn})
	}
	store, err := guestos.Open(filepath.Join(c.StateDir, "guestos"), guestos.Options{Trust: ts, LocallySignedImages: dev.GetLocallySignedImages(), DMVerity: guestos.DMVerityAvailable(), Counter: counter})
	if err != nil {
		return err
	}
	var caPEM []byte
	if p := dev.GetUpdateCaFile(); p != "" {
		if caPEM, err = os.ReadFile(p); err != nil {
			return fmt.Errorf("device setting update_ca_file: %w", err)
		}
	}
	downloads, err := guestos.NewDownloader(filepath.Join(c.StateDir, "downloads"), caPEM, store)
	if err != nil {
		return fmt.Errorf("device setting update_ca_file: %w", err)
	}
	if len(ts.List()) == 0 {
		c.Log.Warn("no trusted CA provisioned: nothing can be installed until a vendor CA is placed in the trust store", "dir", filepath.Join(c.StateDir, "trust", "vendor"))
	}
	// Container inits are re-parented to cmld when the runtime exits; the
	// reaper collects them (and what a cancelled runtime left behind).
	rp := reaper.New(c.Log)
	go rp.Run(ctx)
	rt := &oci.Runtime{Binary: runtimeBin, Root: filepath.Join(c.RunDir, "runtime")}
	// Integrity refusals and failed measurements are audited by the
	// stage that found them, with the caller who asked for the start; a
	// refusal that cannot be recorded is reported as such.
	refused := func(op string) func(context.Context, *container.Start, error) error {
		return func(ctx context.Context, s *container.Start, err error) error {
			e := audit.Event{Type: "container", Operation: op, Subject: audit.SubjectFrom(ctx), Object: s.Name + "/" + s.ID, Outcome: audit.Failure, Reason: err.Error()}
			if aerr := sink.Record(ctx, e); aerr != nil {
				return fmt.Errorf("%w (and the audit trail could not record it: %v)", err, aerr)
			}
			return nil
		}
	}
	configs := container.Acceptor{Trust: ts, Signed: dev.GetSignedConfigs()} // signed_configs defaults to on
	measure := &container.MeasureStage{TPM: measurer, Refused: refused("container.measure")}
	netStage, err := network.New(dev.GetNetwork(), c.Log)
	if err != nil {
		return err
	}
	netStage.Audit = sink
	if err := auditSettingsChange(ctx, c.StateDir, "network.settings", "network", network.Describe(dev.GetNetwork()), sink); err != nil {
		return err
	}
	if err := auditSettingsChange(ctx, c.StateDir, "audit.settings", "audit", describeAudit(dev.GetAudit()), sink); err != nil {
		return err
	}
	storageStage := storage.New(dev.GetStorage(), filepath.Join(c.RunDir, "storage"), sink, c.Log, tpmConn)
	// The start pipeline, in order. Release, recovery and removal run the
	// same stages in reverse.
	stages := []container.Stage{
		&container.VerifyStage{GuestOS: store, Configs: configs, Refused: refused("container.verify")},
		container.NewDeviceStage(),
		storageStage,
		&container.RootfsStage{Runs: filepath.Join(c.RunDir, "containers")},
		netStage,
		measure,
	}
	mgr, err := container.New(container.Options{
		StateDir: filepath.Join(c.StateDir, "containers"),
		RunDir:   c.RunDir,
		Runtime:  rt,
		Exits:    rp,
		GuestOS:  store,
		Audit:    sink,
		Log:      c.Log,
		Configs:  configs,
		Stages:   stages,
	})
	if err != nil {
		return err
	}
	storageStage.Notify = mgr.Annotate
	sink.OnAlert(mgr.Alert)
	as := dev.GetAudit()
	sink.SetCapacity(int64(as.GetAuditSize())<<20, []int{int(as.GetWarnPercent()), int(as.GetWarnPercentHigh())},
		func(reason string) {
			action := as.GetWhenFull()
			c.Log.Error("audit trail full or unwritable: audited operations are refused", "reason", reason, "action", action.String())
			if action == cmlv1.AuditSettings_STOP_CONTAINERS || action == cmlv1.AuditSettings_HALT {
				mgr.StopAll(context.WithoutCancel(ctx))
			}
			if action == cmlv1.AuditSettings_HALT {
				halt(fmt.Errorf("halted: %s", reason))
			}
			if action == cmlv1.AuditSettings_ROTATE && fw != nil {
				// Until the collector holds everything, as FAIL_CLOSED.
				for ctx.Err() == nil {
					if err := sink.Rotate(fw.Confirmed); err == nil {
						c.Log.Info("audit trail rotated after the collector received it")
						sink.Recovered()
						return
					}
					time.Sleep(2 * time.Second)
				}
			}
		},
		func(pct int) { c.Log.Warn("audit trail over its warning threshold", "percent", pct) })
	netStage.Peers = func(name string) (network.Peer, error) {
		id, n, slot, cfg, err := mgr.Peer(name)
		return network.Peer{ID: id, Name: n, Slot: slot, Config: cfg}, err
	}
	if err := mgr.Recover(ctx); err != nil {
		return err
	}
	go func() {
		// Seccomp denials in containers, from the kernel's audit.
		if err := audit.WatchSeccomp(ctx, sink, mgr.Attribute, 10, c.Log); err != nil {
			c.Log.Error("audit: seccomp denials cannot be recorded", "err", err)
		}
	}()
	go func() {
		if err := netStage.WatchDenied(ctx); err != nil {
			c.Log.Error("network: denied packets cannot be audited", "err", err)
		}
	}()
	// The PCR started over (a reboot, or cmld's swtpm restarted with it)
	// under containers that kept running: measure them again, so an
	// attestation still shows everything that runs.
	if measurer.Resets() > 0 {
		if err := measure.MeasureRunning(ctx); err != nil {
			return err
		}
	}
	go remeasure(ctx, measurer, measure, c.Log)

	accounts, err := access.Open(c.StateDir)
	if err != nil {
		return err
	}
	accounts.LimitedRootTrust = dev.GetAccess().GetLimitedRootTrust()
	if err := auditSettingsChange(ctx, c.StateDir, "access.settings", "access", fmt.Sprintf("limited_root_trust=%t", accounts.LimitedRootTrust), sink); err != nil {
		return err
	}
	sessions := access.NewSessions(func() time.Duration { return time.Duration(accounts.Policy().IdleTimeoutSeconds) * time.Second })
	sessions.OnIdleLock = func(se access.Session) {
		sink.Record(ctx, audit.Event{Type: "access", Operation: "access.session.lock", Object: "account " + se.Account, Outcome: audit.Success,
			Reason: fmt.Sprintf("session %s of %s (%s) %s", se.ID, se.Account, se.Principal, se.Locked)})
	}
	go sessions.Run(ctx, time.Second)
	lis, err := listen(c.Socket, c.SocketGroup)
	if err != nil {
		return err
	}
	backups, err := backupSettings(c, dev, keys)
	if err != nil {
		return err
	}
	srv := &api.Server{Containers: mgr, GuestOS: store, Trust: ts, Downloads: downloads, Device: ident, Networks: netStage, Storage: storageStage, Audit: sink, Trail: sink, Forwarder: fw, Accounts: accounts, Sessions: sessions, Backups: backups, Log: c.Log}
	gs := grpc.NewServer(
		grpc.Creds(api.PeerCredentials()),
		grpc.ChainUnaryInterceptor(srv.UnaryInterceptor),
		grpc.ChainStreamInterceptor(srv.StreamInterceptor),
		grpc.MaxRecvMsgSize(1<<20),
	)
	cmlv1.RegisterControlServer(gs, srv)
	// The same API over mutual TLS, when device.conf asks for it.
	if rs := dev.GetRemote(); rs.GetListen() != "" {
		rgs, rlis, err := remoteServer(rs, keys, ident, ts, srv)
		if err != nil {
			return err
		}
		defer rgs.Stop()
		go rgs.Serve(rlis)
		c.Log.Info("remote API listening (mutual TLS)", "address", rlis.Addr().String())
	}
	sink.Record(ctx, audit.Event{Type: "daemon", Operation: "daemon.start", Outcome: audit.Success,
		Details: fmt.Sprintf("pid %d, signed_configs %t, locally_signed_images %t, %d trusted CAs, TPM %s, device %s", os.Getpid(), dev.GetSignedConfigs(), dev.GetLocallySignedImages(), len(ts.List()), tpmConn.Source, ident.UUID())})
	c.Log.Info("cmld ready", "socket", c.Socket, "state", c.StateDir, "runtime", runtimeBin, "dm-verity", store.UsesDMVerity(), "tpm", tpmConn.Source, "device", ident.UUID())

	go mgr.Autostart(ctx)
	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(lis) }()
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	// Shutdown ends in bounded time, even with handlers stuck in a
	// runtime or TPM call: graceful for 2 s, then every connection is
	// closed (which cancels the handlers' contexts), and after 2 s more
	// cmld goes on without waiting for them.
	stopped := make(chan struct{})
	go func() { gs.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(2 * time.Second):
		go gs.Stop()
		select {
		case <-stopped:
		case <-time.After(2 * time.Second):
			c.Log.Warn("shutdown: handlers still running; exiting without them")
		}
	}
	os.Remove(c.Socket)
	sink.Record(context.Background(), audit.Event{Type: "daemon", Operation: "daemon.stop", Outcome: audit.Success})
	if cause := context.Cause(ctx); err == nil && cause != nil && !errors.Is(cause, context.Canceled) {
		err = cause // the audit trail's HALT action
	}
	return err
}

// remeasure watches for the PCR starting over while cmld runs (its swtpm
// was restarted after a crash) and measures the running containers again.
func remeasure(ctx context.Context, m *tpm.Measurer, mgr *container.MeasureStage, log *slog.Logger) {
	seen := m.Resets()
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := m.Check(); err != nil {
			log.Error("measurement log and TPM disagree", "err", err)
			continue
		}
		if n := m.Resets(); n != seen {
			seen = n
			log.Warn("TPM PCRs were reset under running containers; measuring them again")
			if err := mgr.MeasureRunning(ctx); err != nil {
				log.Error("re-measure", "err", err)
			}
		}
	}
}

// backupSettings are the owner's backup recipients (device.conf backup)
// and the device key that signs backups.
func backupSettings(c Config, dev *cmlv1.DeviceConfig, keys *tpm.Keys) (*api.Backups, error) {
	rs, err := backup.ParseRecipients(strings.Join(dev.GetBackup().GetRecipients(), "\n"))
	if err != nil {
		return nil, fmt.Errorf("device config: %w", err)
	}
	signer, err := keys.TLS.GetSigner()
	if err != nil {
		return nil, fmt.Errorf("backup signing key: %w", err)
	}
	path := c.DeviceConfig
	if path == "" {
		path = filepath.Join(c.StateDir, "device.conf")
	}
	return &api.Backups{Recipients: rs, Signer: signer, DeviceConf: path}, nil
}

// loadDevice reads the device settings; a missing default file means the
// defaults, a missing file named explicitly is an error.
func loadDevice(c Config) (*cmlv1.DeviceConfig, error) {
	path := c.DeviceConfig
	if path == "" {
		path = filepath.Join(c.StateDir, "device.conf")
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && c.DeviceConfig == "" {
		return &cmlv1.DeviceConfig{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("device config: %w", err)
	}
	return config.ParseDevice(path, b)
}

// listen opens the control socket 0660, group-owned by group when it
// exists, replacing a stale socket a crashed daemon left.
func listen(path, group string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if conn, err := net.Dial("unix", path); err == nil {
		conn.Close()
		return nil, fmt.Errorf("control socket %s is in use by another daemon", path)
	}
	os.Remove(path)
	old := unix.Umask(0o117)
	lis, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		lis.Close()
		return nil, err
	}
	if g, err := user.LookupGroup(group); err == nil {
		gid, _ := strconv.Atoi(g.Gid)
		os.Chown(path, 0, gid)
	}
	return lis, nil
}

// checkTraversable makes sure processes of user-namespaced containers
// (unprivileged host uids) can reach their root filesystem under dir;
// otherwise every start would fail with a cryptic runtime error.
func checkTraversable(dir string) error {
	for p := dir; ; p = filepath.Dir(p) {
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		if st.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("run directory %s: %s is not searchable by others (mode %o); containers with a user namespace could not reach their root filesystem", dir, p, st.Mode().Perm())
		}
		if p == "/" {
			return nil
		}
	}
}

// describeAudit renders the audit settings on one line, defaults spelled
// out (the getters give the defaults for a missing section).
func describeAudit(a *cmlv1.AuditSettings) string {
	return fmt.Sprintf("audit_size=%dMB warn_percent=%d warn_percent_high=%d when_full=%s checkpoint_every=%d checkpoint_interval_seconds=%d collector=%q collector_ca_file=%q",
		a.GetAuditSize(), a.GetWarnPercent(), a.GetWarnPercentHigh(), a.GetWhenFull(), a.GetCheckpointEvery(), a.GetCheckpointIntervalSeconds(), a.GetCollector(), a.GetCollectorCaFile())
}

// auditSettingsChange records a change of a section of the device
// settings against the last start's (kept in <state>/<file>).
func auditSettingsChange(ctx context.Context, stateDir, file, section, now string, sink audit.Recorder) error {
	path := filepath.Join(stateDir, file)
	before, err := os.ReadFile(path)
	if err == nil && string(before) == now {
		return nil
	}
	was := "(first start)"
	if err == nil {
		was = string(before)
	}
	if err := sink.Record(ctx, audit.Event{Type: "daemon", Operation: file, Outcome: audit.Success,
		Reason: fmt.Sprintf("device %s settings changed from %s to %s", section, was, now)}); err != nil {
		return err
	}
	return atomicfile.Write(path, []byte(now), 0o600)
}

// forwarder sets up forwarding of the audit trail to the collector named
// in device.conf, over mutual TLS with the device's TPM-held TLS key.
func forwarder(sink *audit.FileSink, as *cmlv1.AuditSettings, keys *tpm.Keys, ident *device.Identity, log *slog.Logger) (*audit.Forwarder, error) {
	host, _, err := net.SplitHostPort(as.GetCollector())
	if err != nil {
		return nil, fmt.Errorf("device setting audit.collector: %w", err)
	}
	caPEM, err := os.ReadFile(as.GetCollectorCaFile())
	if err != nil {
		return nil, fmt.Errorf("device setting audit.collector_ca_file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("device setting audit.collector_ca_file: no certificate in %s", as.GetCollectorCaFile())
	}
	cert, err := deviceTLS(keys, ident)
	if err != nil {
		return nil, fmt.Errorf("audit forwarding: %w", err)
	}
	name := as.GetCollectorServerName()
	if name == "" {
		name = host
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, ServerName: name,
		Certificates: []tls.Certificate{cert}}
	hostname, _ := os.Hostname()
	return &audit.Forwarder{Sink: sink, Addr: as.GetCollector(), TLS: cfg, Hostname: hostname, DeviceUUID: ident.UUID(), Log: log}, nil
}

// remoteServer is the control API over mutual TLS: the server key is the
// device's TPM-held TLS key with its provisioned certificate; a client
// must present a certificate chaining to an owner CA, valid and not
// revoked, that maps to an account (checked per call). TLS 1.3, or 1.2
// with ECDHE and AEAD suites only; bounded connections and idle time.
func remoteServer(rs *cmlv1.RemoteSettings, keys *tpm.Keys, ident *device.Identity, ts *trust.Store, srv *api.Server) (*grpc.Server, net.Listener, error) {
	cert, err := deviceTLS(keys, ident)
	if err != nil {
		return nil, nil, fmt.Errorf("remote API: %w", err)
	}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAnyClientCert,
		MinVersion:   tls.VersionTLS12,
		CipherSuites: []uint16{ // TLS 1.2: ECDHE with AEAD only
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
		// Owner CAs and CRLs change at run time: checked at every
		// handshake, resumed ones included (VerifyPeerCertificate is not
		// called on a resumption, so a certificate revoked after its
		// first handshake could come back with a session ticket).
		VerifyConnection: func(cs tls.ConnectionState) error {
			return ts.VerifyClient(cs.PeerCertificates)
		},
	}
	if rs.GetTls13Only() {
		cfg.MinVersion = tls.VersionTLS13
	}
	lis, err := net.Listen("tcp", rs.GetListen())
	if err != nil {
		return nil, nil, fmt.Errorf("remote API: %w", err)
	}
	// Per address first (the excess is closed at once), then overall (the
	// excess waits for a slot).
	lis = netutil.LimitListener(limitPerHost(lis, int(rs.GetMaxConnectionsPerHost())), int(rs.GetMaxConnections()))
	gs := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(cfg)),
		grpc.ChainUnaryInterceptor(srv.UnaryInterceptor),
		grpc.ChainStreamInterceptor(srv.StreamInterceptor),
		grpc.MaxRecvMsgSize(1<<20),
		grpc.ConnectionTimeout(10*time.Second),
		grpc.MaxConcurrentStreams(64),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: 10 * time.Minute}),
	)
	cmlv1.RegisterControlServer(gs, srv)
	return gs, lis, nil
}

// deviceTLS is the device's TLS identity: the key in the TPM (a signer;
// it never leaves the TPM) with the certificate chain installed for it.
func deviceTLS(keys *tpm.Keys, ident *device.Identity) (tls.Certificate, error) {
	signer, err := keys.TLS.GetSigner()
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("TLS key: %w", err)
	}
	var chain [][]byte
	rest := ident.Info().GetTlsCertificate()
	for {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		chain = append(chain, b.Bytes)
	}
	return tls.Certificate{Certificate: chain, PrivateKey: signer}, nil
}
