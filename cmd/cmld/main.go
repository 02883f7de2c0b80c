// Command cmld is the CML daemon: it runs isolated service containers and
// serves the control API on a local unix socket.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/cmlproject/cml/internal/daemon"
)

func main() {
	if err := daemon.OwnMountNamespace(); err != nil {
		fmt.Fprintln(os.Stderr, "cmld:", err)
		os.Exit(1)
	}
	var c daemon.Config
	// cmld's own flag set: libraries it links register flags on the
	// global one (go-tpm-tools' SEV and TDX guest code) that are not
	// cmld's to offer.
	flag := flag.NewFlagSet("cmld", flag.ExitOnError)
	flag.StringVar(&c.StateDir, "state-dir", "", "persistent state directory (default /var/lib/cml)")
	flag.StringVar(&c.RunDir, "run-dir", "", "runtime state directory (default /run/cml)")
	flag.StringVar(&c.Socket, "socket", "", "control socket path (default <run-dir>/control.sock)")
	flag.StringVar(&c.SocketGroup, "socket-group", "", "group that may use the control socket (default cml, if it exists)")
	flag.StringVar(&c.Runtime, "runtime", "", "OCI runtime binary (default runc)")
	flag.StringVar(&c.DeviceConfig, "device-config", "", "device settings file (default <state-dir>/device.conf, if present)")
	debug := flag.Bool("debug", false, "log debug messages")
	flag.Parse(os.Args[1:])
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	c.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := daemon.Run(ctx, c); err != nil {
		fmt.Fprintln(os.Stderr, "cmld:", err)
		os.Exit(1)
	}
}
