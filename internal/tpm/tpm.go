package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
	"golang.org/x/sys/unix"

	"github.com/cmlproject/cml/internal/errdefs"
)

// DevicePath is the kernel's TPM resource manager, used when present.
const DevicePath = "/dev/tpmrm0"

// maxResponse bounds one TPM response (TPM 2.0 library: 4096 bytes).
const maxResponse = 4096

// Conn is one connection to a TPM that serializes commands: each Write of
// a command holds the connection until the whole response has been read,
// so concurrent callers (measurement, quotes, identity) cannot interleave.
// It also reassembles responses a stream socket delivers in pieces.
type Conn struct {
	mu   sync.Mutex // held from a command's Write to its response's last Read
	rw   io.ReadWriteCloser
	dial func() (io.ReadWriteCloser, error) // reconnects after a broken connection (swtpm); nil otherwise
	resp []byte
	// pending is set while a command's response is owed; mu is held then.
	pending bool
	// Source names the TPM for logs and status: "/dev/tpmrm0", "swtpm …",
	// "simulator".
	Source string
	// Timeout bounds each command (default CommandTimeout): a TPM that
	// does not answer fails the operation instead of hanging it.
	Timeout time.Duration
}

// CommandTimeout is how long a TPM command may take by default. ECC key
// creation on a slow discrete TPM takes about a second; nothing cmld asks
// for comes near this.
const CommandTimeout = 10 * time.Second

// ErrUnavailable is the error class of a TPM that does not answer.
var ErrUnavailable = errdefs.ErrUnavailable

type deadliner interface{ SetDeadline(time.Time) error }

// NewConn wraps an open TPM connection.
func NewConn(rw io.ReadWriteCloser, source string) *Conn {
	return &Conn{rw: rw, Source: source}
}

// Write sends one command.
func (c *Conn) Write(cmd []byte) (int, error) {
	c.mu.Lock()
	if c.rw == nil && c.dial != nil {
		rw, err := c.dial()
		if err != nil {
			c.mu.Unlock()
			return 0, fmt.Errorf("reconnect to %s: %w", c.Source, err)
		}
		c.rw = rw
	}
	n, err := c.send(cmd)
	if err != nil && c.dial != nil {
		// The TPM restarted since the last command (supervised swtpm):
		// the command never reached it, so reconnect and send it once
		// more.
		c.broken()
		if rw, derr := c.dial(); derr == nil {
			c.rw = rw
			n, err = c.send(cmd)
		}
	}
	if err != nil {
		c.broken()
		c.mu.Unlock()
		return n, err
	}
	c.resp = c.resp[:0]
	c.pending = true
	return n, nil
}

func (c *Conn) send(cmd []byte) (int, error) {
	if d, ok := c.rw.(deadliner); ok {
		t := c.Timeout
		if t == 0 {
			t = CommandTimeout
		}
		d.SetDeadline(time.Now().Add(t))
	}
	return c.rw.Write(cmd)
}

// Read returns the response to the last command, whole.
func (c *Conn) Read(p []byte) (int, error) {
	if !c.pending {
		return 0, errors.New("TPM read without a command")
	}
	defer func() { c.pending = false; c.mu.Unlock() }()
	buf := make([]byte, maxResponse)
	for {
		if len(c.resp) >= 10 {
			size := int(binary.BigEndian.Uint32(c.resp[2:6]))
			if size < 10 || size > maxResponse {
				c.broken()
				return 0, fmt.Errorf("TPM response of %d bytes", size)
			}
			if len(c.resp) >= size {
				if len(p) < size {
					return 0, io.ErrShortBuffer
				}
				return copy(p, c.resp[:size]), nil
			}
		}
		n, err := c.rw.Read(buf)
		c.resp = append(c.resp, buf[:n]...)
		if err != nil {
			c.broken()
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return 0, errdefs.Wrap(errdefs.ErrUnavailable, err, "TPM unavailable (%s)", c.Source)
			}
			return 0, err
		}
	}
}

func (c *Conn) broken() {
	// A response that arrives after its deadline would be read as the
	// answer to the next command: drop the connection, redial later.
	if c.dial != nil && c.rw != nil {
		c.rw.Close()
		c.rw = nil
	}
}

// Close closes the connection.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rw == nil {
		return nil
	}
	err := c.rw.Close()
	c.rw = nil
	return err
}

// OpenDevice opens a kernel TPM resource manager such as /dev/tpmrm0.
func OpenDevice(path string) (*Conn, error) {
	// Blocking, and kept away from Go's poller: opened non-blocking, the
	// kernel's TPM device runs a command asynchronously and a read before
	// the answer returns 0 bytes (EOF), not EAGAIN. The kernel enforces
	// its own command timeouts on this path; Timeout applies to sockets.
	dial := func() (io.ReadWriteCloser, error) {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, &os.PathError{Op: "open", Path: path, Err: err}
		}
		return os.NewFile(uintptr(fd), path), nil
	}
	f, err := dial()
	if err != nil {
		return nil, err
	}
	return &Conn{rw: f, dial: dial, Source: path}, nil
}

// Swtpm is a software TPM (swtpm) that cmld runs and supervises when the
// device has no TPM. Its state (persistent keys, NV indices) lives in a
// directory under cmld's state directory and survives restarts; its PCRs
// are reset each time it starts, like a TPM at boot. It dies with cmld.
type Swtpm struct {
	dir, socket string
	log         *slog.Logger
	mu          sync.Mutex
	cmd         *exec.Cmd
	stopping    bool
	exited      chan struct{}
}

// StartSwtpm starts swtpm on the state directory dir (created 0700) and
// waits until its socket answers. The command socket is dir/tpm.sock and
// its control socket dir/tpm.sock.ctrl, the layout tpm2-tools' swtpm TCTI
// expects, so an operator can inspect the TPM while cmld is stopped.
func StartSwtpm(ctx context.Context, dir string, log *slog.Logger) (*Swtpm, error) {
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		return nil, errors.New("no TPM at " + DevicePath + " and swtpm is not installed (apt install swtpm)")
	}
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o700); err != nil {
		return nil, err
	}
	s := &Swtpm{dir: dir, socket: filepath.Join(dir, "tpm.sock"), log: log}
	if err := s.start(bin); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		// Ready means it answers a command: swtpm opens its socket before
		// it takes the lock on its state, so a second swtpm on the same
		// state (another cmld) accepts a connection and then exits.
		if answers(s.socket) {
			break
		}
		select {
		case <-s.exited:
			return nil, fmt.Errorf("swtpm exited at start (state %s): %s", dir, lastLine(filepath.Join(dir, "swtpm.log")))
		default:
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			s.Stop()
			return nil, fmt.Errorf("swtpm did not open %s", s.socket)
		}
		time.Sleep(20 * time.Millisecond)
	}
	go s.supervise(bin)
	return s, nil
}

func (s *Swtpm) start(bin string) error {
	os.Remove(s.socket)
	os.Remove(s.socket + ".ctrl")
	cmd := exec.Command(bin, "socket", "--tpm2",
		"--tpmstate", "dir="+filepath.Join(s.dir, "state")+",mode=0600",
		"--server", "type=unixio,path="+s.socket+",mode=0600",
		"--ctrl", "type=unixio,path="+s.socket+".ctrl,mode=0600",
		"--flags", "not-need-init,startup-clear")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM, Setpgid: true}
	out, err := os.OpenFile(filepath.Join(s.dir, "swtpm.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = out, out
	err = cmd.Start()
	out.Close()
	if err != nil {
		return fmt.Errorf("start swtpm: %w", err)
	}
	s.mu.Lock()
	s.cmd = cmd
	s.exited = make(chan struct{})
	s.mu.Unlock()
	go func(ch chan struct{}) { cmd.Wait(); close(ch) }(s.exited)
	return nil
}

// supervise restarts swtpm when it dies unexpectedly. Its PCRs restart
// from zero; the measurement log notices and starts over (see Measurer).
func (s *Swtpm) supervise(bin string) {
	for {
		s.mu.Lock()
		ch := s.exited
		s.mu.Unlock()
		<-ch
		s.mu.Lock()
		stopping := s.stopping
		s.mu.Unlock()
		if stopping {
			return
		}
		s.log.Error("swtpm exited; restarting it (PCRs start over)", "state", s.dir)
		time.Sleep(200 * time.Millisecond)
		if err := s.start(bin); err != nil {
			s.log.Error("restart swtpm", "err", err)
			return
		}
	}
}

// answers reports whether the TPM on socket answers TPM2_GetRandom.
func answers(socket string) bool {
	c, err := net.DialTimeout("unix", socket, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	// TPM2_GetRandom(8): tag NO_SESSIONS, size 12, command code 0x17B.
	cmd := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 8}
	if _, err := c.Write(cmd); err != nil {
		return false
	}
	resp := make([]byte, 10)
	if _, err := io.ReadFull(c, resp); err != nil {
		return false
	}
	return binary.BigEndian.Uint32(resp[6:10]) == 0 // TPM_RC_SUCCESS
}

// Dial connects to the running swtpm; the connection redials after a
// swtpm restart.
func (s *Swtpm) Dial() (*Conn, error) {
	dial := func() (io.ReadWriteCloser, error) { return net.Dial("unix", s.socket) }
	rw, err := dial()
	if err != nil {
		return nil, err
	}
	return &Conn{rw: rw, dial: dial, Source: "swtpm " + s.dir}, nil
}

// Stop terminates swtpm (it saves its state on SIGTERM).
func (s *Swtpm) Stop() {
	s.mu.Lock()
	s.stopping = true
	cmd, ch := s.cmd, s.exited
	s.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		<-ch
	}
}

// Open opens the TPM cmld uses: the kernel's resource manager when
// DevicePath exists, otherwise its own swtpm with state in swtpmDir. The
// returned stop function ends swtpm, if one was started.
func Open(ctx context.Context, swtpmDir string, log *slog.Logger) (*Conn, func(), error) {
	if _, err := os.Stat(DevicePath); err == nil {
		c, err := OpenDevice(DevicePath)
		return c, func() {}, err
	}
	s, err := StartSwtpm(ctx, swtpmDir, log)
	if err != nil {
		return nil, nil, err
	}
	c, err := s.Dial()
	if err != nil {
		s.Stop()
		return nil, nil, err
	}
	// An orderly TPM2_Shutdown before swtpm ends: without it the TPM
	// counts the next startup as a dictionary-attack failure (after any
	// use of a DA-protected key), and a few restarts lock it out.
	return c, func() { tpm2.Shutdown(c, tpm2.StartupState); c.Close(); s.Stop() }, nil
}

// lastLine returns the last non-empty line of a small log file.
func lastLine(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}
