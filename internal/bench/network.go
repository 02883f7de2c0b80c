package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
)

// The bench's own network: an "outside" namespace behind the uplink
// (10.233.0.0/24, server on .2) and a bare namespace with the same routed
// link as a container (10.233.1.0/31) but no filter rules. Only this
// machine's namespaces see a packet.
const (
	benchUplink  = "cmlbup0"
	benchOutNS   = "cmlbench-out"
	benchBareNS  = "cmlbench-bare"
	benchBareIf  = "cmlbbare0"
	benchServer  = "10.233.0.2"
	benchNetConf = `network {
  uplink: "cmlbup0"
  nft_table: "cmlbench"
  nflog_group: 2790
}
`
	benchNetFlows = `network_flows { direction: EGRESS peer_uplink: true protocol: TCP ports: "5201" }
`
)

func sh(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// benchNetwork makes the outside namespace and the bare baseline path.
func benchNetwork() (func(), error) {
	cleanup := func() {
		exec.Command("ip", "link", "del", benchUplink).Run()
		exec.Command("ip", "link", "del", benchBareIf).Run()
		exec.Command("ip", "netns", "del", benchOutNS).Run()
		exec.Command("ip", "netns", "del", benchBareNS).Run()
		exec.Command("nft", "delete", "table", "ip", "cmlbenchbare").Run()
		exec.Command("pkill", "-f", "iperf3 -s -B "+benchServer).Run()
	}
	cleanup()
	steps := [][]string{
		{"ip", "netns", "add", benchOutNS},
		{"ip", "link", "add", benchUplink, "type", "veth", "peer", "name", "eth0", "netns", benchOutNS},
		{"ip", "addr", "add", "10.233.0.1/24", "dev", benchUplink},
		{"ip", "link", "set", benchUplink, "up"},
		{"ip", "-n", benchOutNS, "addr", "add", benchServer + "/24", "dev", "eth0"},
		{"ip", "-n", benchOutNS, "link", "set", "eth0", "up"},
		{"ip", "-n", benchOutNS, "link", "set", "lo", "up"},
		{"ip", "netns", "add", benchBareNS},
		{"ip", "link", "add", benchBareIf, "type", "veth", "peer", "name", "eth0", "netns", benchBareNS},
		{"ip", "addr", "add", "10.233.1.0/31", "dev", benchBareIf},
		{"ip", "link", "set", benchBareIf, "up"},
		{"ip", "-n", benchBareNS, "addr", "add", "10.233.1.1/31", "dev", "eth0"},
		{"ip", "-n", benchBareNS, "link", "set", "eth0", "up"},
		{"ip", "-n", benchBareNS, "route", "add", "default", "via", "10.233.1.0"},
		// The same masquerade as cmld's, in a table of its own.
		{"nft", "add table ip cmlbenchbare"},
		{"nft", "add chain ip cmlbenchbare post { type nat hook postrouting priority srcnat; }"},
		{"nft", "add rule ip cmlbenchbare post oifname " + benchUplink + " ip saddr 10.233.1.0/31 masquerade"},
		{"ip", "netns", "exec", benchOutNS, "iperf3", "-s", "-B", benchServer, "-D"},
	}
	for _, s := range steps {
		if s[0] == "nft" {
			s = append([]string{"nft"}, strings.Fields(s[1])...)
		}
		if err := sh(s...); err != nil {
			cleanup()
			return nil, err
		}
	}
	for _, f := range []string{benchUplink, benchBareIf} {
		os.WriteFile("/proc/sys/net/ipv4/conf/"+f+"/forwarding", []byte("1"), 0)
	}
	return cleanup, nil
}

// iperf runs a 2 s iperf3 client in a network namespace (a path to a
// namespace file) and returns the received bits per second.
func iperf(ns string) (float64, error) {
	out, err := exec.Command("nsenter", "--net="+ns, "iperf3", "-c", benchServer, "-t", "2", "-J").Output()
	if err != nil {
		return 0, fmt.Errorf("iperf3 in %s: %v: %s", ns, err, out)
	}
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return 0, err
	}
	return r.End.SumReceived.BitsPerSecond, nil
}

// networkFigures measures (1) the network stage of a start (namespace,
// link, rules) and its teardown, next to a start and stop of the same
// container without a network, and (2) throughput from a container to the
// outside namespace through the full rule set against the same routed
// path with no rules, interleaved.
func networkFigures(w io.Writer, tmp string, ctl func(...string) error, conf func(string, ...string) string, sock string, o Options) error {
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	api := cmlv1.NewControlClient(conn)
	ctx := context.Background()
	if err := ctl("create", conf("benchnet", benchNetFlows)); err != nil {
		return err
	}
	type pair struct{ start, stop time.Duration }
	var with, without []pair
	var stage []time.Duration
	one := func(name string) (pair, *cmlv1.Container, error) {
		t0 := time.Now()
		c, err := api.Start(ctx, &cmlv1.ContainerRef{NameOrUuid: proto.String(name)})
		if err != nil {
			return pair{}, nil, err
		}
		p := pair{start: time.Since(t0)}
		if name == "benchnet" {
			stage = append(stage, runTimings(filepath.Join(tmp, "run", "containers", c.GetUuid(), "run.json"))["network"])
		}
		t0 = time.Now()
		if _, err := api.Stop(ctx, &cmlv1.StopRequest{NameOrUuid: proto.String(name), TimeoutSeconds: proto.Uint32(1)}); err != nil {
			return p, nil, err
		}
		p.stop = time.Since(t0)
		return p, c, nil
	}
	for r := 0; r < o.Runs; r++ {
		a, _, err := one("benchnet")
		if err != nil {
			return fmt.Errorf("networked start: %w", err)
		}
		b, _, err := one("bench")
		if err != nil {
			return err
		}
		with, without = append(with, a), append(without, b)
	}
	starts := func(ps []pair) (s, t []time.Duration) {
		for _, p := range ps {
			s, t = append(s, p.start), append(t, p.stop)
		}
		return
	}
	ws, wt := starts(with)
	bs, bt := starts(without)
	var extra []time.Duration
	for i := range wt {
		extra = append(extra, wt[i]-bt[i])
	}
	fmt.Fprintf(w, "network: start and stop of a container with a network (own namespace, routed link, rules) next to the same container without, %d interleaved rounds\n", o.Runs)
	fmt.Fprintf(w, "  network stage of a start (namespace, link, rules), median %6.2f ms   goal <= 5\n", ms(median(stage)))
	fmt.Fprintf(w, "  start with network median %6.1f ms, without %6.1f ms; median of per-round ratios %.2f\n", ms(median(ws)), ms(median(bs)), medianRatio(ws, bs))
	fmt.Fprintf(w, "  stop with network median %6.1f ms, without %6.1f ms; teardown (median per-round difference) %.2f ms\n", ms(median(wt)), ms(median(bt)), ms(median(extra)))

	// Throughput: iperf3 from the container's namespace through cmld's
	// rules and NAT, against the bare namespace through NAT only.
	c, err := api.Start(ctx, &cmlv1.ContainerRef{NameOrUuid: proto.String("benchnet")})
	if err != nil {
		return err
	}
	defer api.Stop(ctx, &cmlv1.StopRequest{NameOrUuid: proto.String("benchnet"), TimeoutSeconds: proto.Uint32(1)})
	ctrNS := fmt.Sprintf("/proc/%d/ns/net", c.GetPid())
	bareNS := "/run/netns/" + benchBareNS
	var rules, bare []float64
	rounds := 5
	for r := 0; r < rounds; r++ {
		a, err := iperf(ctrNS)
		if err != nil {
			return err
		}
		b, err := iperf(bareNS)
		if err != nil {
			return err
		}
		rules, bare = append(rules, a), append(bare, b)
	}
	fmt.Fprintf(w, "  throughput container -> outside namespace (iperf3, 2 s, %d interleaved pairs): with the rule set median %.2f Gbit/s, same path without rules %.2f Gbit/s; median of per-pair ratios %.3f   goal >= 0.9\n",
		rounds, medianF(rules)/1e9, medianF(bare)/1e9, medianPairRatio(rules, bare))
	return nil
}

// medianPairRatio is the median of a[i]/b[i] over interleaved pairs.
func medianPairRatio(a, b []float64) float64 {
	var r []float64
	for i := range a {
		if i < len(b) && b[i] != 0 {
			r = append(r, a[i]/b[i])
		}
	}
	if len(r) == 0 {
		return 0
	}
	return medianF(r)
}

func medianF(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}
