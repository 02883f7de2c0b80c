package network

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"google.golang.org/protobuf/proto"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
	"github.com/cmlproject/cml/internal/audit"
	"github.com/cmlproject/cml/internal/audittest"
	"github.com/cmlproject/cml/internal/config"
	"github.com/cmlproject/cml/internal/container"
	"github.com/cmlproject/cml/internal/testutil"
)

func testSettings(t *testing.T) *cmlv1.NetworkSettings {
	return &cmlv1.NetworkSettings{
		NftTable:   proto.String(fmt.Sprintf("cmlunit%d", os.Getpid())),
		LinkPrefix: proto.String("10.198.0.0/24"),
		NflogGroup: proto.Uint32(uint32(4000 + os.Getpid()%1000)),
	}
}

func newTestStage(t *testing.T) *Stage {
	t.Helper()
	testutil.RequireRoot(t)
	st, err := New(testSettings(t), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c, _ := nftables.New()
		c.DelTable(st.fw.table)
		c.Flush()
		for _, l := range strayLinks(st.fw.s.Table+":", nil) {
			netlink.LinkDel(l)
		}
	})
	if err := st.Sweep(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	st.mu.Lock()
	err = st.ready
	st.mu.Unlock()
	if err != nil {
		t.Skipf("nftables unavailable: %v", err)
	}
	return st
}

// TestRulesReadBack: what cmlctl network reports is decoded from the
// kernel's rules, and it is what the policy asked for.
func TestRulesReadBack(t *testing.T) {
	st := newTestStage(t)
	id := "00000000-0000-4000-8000-000000000001"
	pol := Policy{ID: id, Link: "cmlunit0", Addr: "10.198.0.1", HostAddr: "10.198.0.0", Rules: []Rule{
		{Direction: cmlv1.NetworkFlow_EGRESS, PeerCIDR: "192.0.2.0/24", Protocol: cmlv1.NetworkFlow_TCP, Ports: []config.PortRange{{From: 80, To: 80}, {From: 8000, To: 8080}}},
		{Direction: cmlv1.NetworkFlow_INGRESS, PeerIf: "cmlpeer0", Protocol: cmlv1.NetworkFlow_UDP, Ports: []config.PortRange{{From: 7001, To: 7001}}, OneWay: true},
		{Direction: cmlv1.NetworkFlow_EGRESS, PeerCIDR: "0.0.0.0/0", Protocol: cmlv1.NetworkFlow_ICMP},
	}}
	c, _ := nftables.New()
	if err := st.fw.add(c, pol); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range []struct {
		ch  string
		dir cmlv1.NetworkFlow_Direction
	}{{egressChain(id), cmlv1.NetworkFlow_EGRESS}, {ingressChain(id), cmlv1.NetworkFlow_INGRESS}} {
		rules, err := c.GetRules(st.fw.table, st.fw.chain(d.ch))
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			if f, peerIf, ok := decodeRule(r, d.dir); ok {
				got = append(got, fmt.Sprintf("%s %s%s %s %v %t", f.GetDirection(), f.GetPeer(), peerIf, f.GetProtocol(), f.GetPorts(), f.GetOneWay()))
			}
		}
	}
	want := []string{
		"EGRESS 192.0.2.0/24 TCP [80] false", "EGRESS 192.0.2.0/24 TCP [8000-8080] false", "EGRESS 0.0.0.0/0 ICMP [] false",
		"INGRESS cmlpeer0 UDP [7001] true",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("read back:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if err := st.fw.remove(id); err != nil {
		t.Fatal(err)
	}
	chains, _ := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	for _, ch := range chains {
		if ch.Table.Name == st.fw.table.Name && strings.Contains(ch.Name, id) {
			t.Errorf("chain %s left after remove", ch.Name)
		}
	}
	if elems, _ := c.GetSetElements(st.fw.links); len(elems) != 0 {
		t.Errorf("links set keeps %d elements after remove", len(elems))
	}
}

// TestConcurrentStartsAndStops: six networked starts at once, two of them
// competing for one assigned interface; then all stop at once. Each gets
// its own link and rules, exactly one gets the interface, and nothing is
// left afterwards. Run under -race.
func TestConcurrentStartsAndStops(t *testing.T) {
	st := newTestStage(t)
	nic := fmt.Sprintf("cmlun%d", os.Getpid()%100000)
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: nic}, PeerName: nic + "p"}); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if l, err := netlink.LinkByName(nic + "p"); err == nil {
			netlink.LinkDel(l)
		}
	}()
	st.Peers = func(name string) (Peer, error) { return Peer{}, fmt.Errorf("no peers here") }
	const n = 6
	type result struct {
		id  string
		rec any
		err error
	}
	results := make([]result, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			id := fmt.Sprintf("00000000-0000-4000-8000-%012d", i)
			cfg := &cmlv1.ContainerConfig{Name: proto.String(fmt.Sprint("c", i)), NetworkFlows: []*cmlv1.NetworkFlow{
				{Direction: cmlv1.NetworkFlow_EGRESS.Enum(), PeerCidr: proto.String("192.0.2.0/24"), Protocol: cmlv1.NetworkFlow_TCP.Enum()},
			}}
			if i < 2 {
				cfg.NetIfaces = []*cmlv1.ContainerPnetConfig{{Netif: proto.String(nic)}}
			}
			s := &container.Start{ID: id, Name: cfg.GetName(), Config: cfg, RunDir: t.TempDir(), Slot: uint32(i)}
			rec, err := st.Prepare(context.Background(), s)
			results[i] = result{id, rec, err}
		}(i)
	}
	wg.Wait()
	holders := 0
	for i, r := range results {
		if i < 2 {
			if r.err == nil {
				holders++
			} else if !strings.Contains(r.err.Error(), "assigned to running container") && !strings.Contains(r.err.Error(), "does not exist") {
				t.Errorf("competing start %d: %v", i, r.err)
			}
			continue
		}
		if r.err != nil {
			t.Errorf("start %d: %v", i, r.err)
		}
	}
	if holders != 1 {
		t.Errorf("%d starts hold the assigned interface, want exactly 1", holders)
	}
	if got := len(st.Running()); got != n-1 {
		t.Errorf("%d containers with a network, want %d", got, n-1)
	}
	for _, r := range results {
		if r.err != nil {
			continue
		}
		wg.Add(1)
		go func(id string) {
			defer wg.Done()
			if err := st.Release(context.Background(), id, nil); err != nil {
				t.Errorf("release %s: %v", id, err)
			}
		}(r.id)
	}
	wg.Wait()
	if l := strayLinks(st.fw.s.Table+":", nil); len(l) != 0 {
		t.Errorf("%d links left", len(l))
	}
	if _, err := netlink.LinkByName(nic); err != nil {
		t.Errorf("assigned interface did not return: %v", err)
	}
	c, _ := nftables.New()
	chains, _ := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	for _, ch := range chains {
		if ch.Table.Name == st.fw.table.Name && (strings.HasPrefix(ch.Name, "eg-") || strings.HasPrefix(ch.Name, "in-")) {
			t.Errorf("chain %s left", ch.Name)
		}
	}
}

// TestFailedInstallLeavesNothing: when the rules cannot be installed the
// start fails and its namespace and link are gone.
func TestFailedInstallLeavesNothing(t *testing.T) {
	st := newTestStage(t)
	// The table vanishes under the stage (an operator's nft flush, say).
	c, _ := nftables.New()
	c.DelTable(st.fw.table)
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	cfg := &cmlv1.ContainerConfig{Name: proto.String("x"), DnsServer: proto.String("192.0.2.53")}
	s := &container.Start{ID: "00000000-0000-4000-8000-00000000000f", Name: "x", Config: cfg, RunDir: t.TempDir()}
	_, err := st.Prepare(context.Background(), s)
	if err == nil || !strings.Contains(err.Error(), "firewall rules") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("start without a table: %v, want a one-line refusal", err)
	}
	if l := strayLinks(st.fw.s.Table+":", nil); len(l) != 0 {
		t.Errorf("a failed start left %d links", len(l))
	}
	if len(st.Running()) != 0 || s.NetNSPath != "" {
		t.Errorf("a failed start is recorded as running")
	}
}

func ipv4udp(src, dst string, sport, dport uint16) []byte {
	b := make([]byte, 28)
	b[0], b[9] = 0x45, 17
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	binary.BigEndian.PutUint16(b[20:], sport)
	binary.BigEndian.PutUint16(b[22:], dport)
	return b
}

// TestDeniedRecordsAreBounded: a flood of denied packets yields the
// per-second budget of records and one summary with the rest counted.
func TestDeniedRecordsAreBounded(t *testing.T) {
	rec := &audittest.Recorder{}
	st := &Stage{raw: &cmlv1.NetworkSettings{}, Audit: rec, Log: slog.New(slog.DiscardHandler), running: map[string]*run{}, byIndex: map[int]string{}, denied: &audit.Limiter{PerSecond: 10}, fw: newFirewall(Settings{Table: "cmlnone"})}
	st.running["id1"] = &run{rec: record{Name: "a"}, index: 7}
	st.byIndex[7] = "id1"
	p, ok := parsePacket(ipv4udp("10.0.0.1", "192.0.2.9", 40000, 9999))
	if !ok || p.String() != "udp 10.0.0.1:40000 -> 192.0.2.9:9999" {
		t.Fatalf("parsed %v %q", ok, p)
	}
	p.InIndex = 7
	now := time.Now()
	for i := 0; i < 1000; i++ {
		st.denied1(context.Background(), p, now)
	}
	st.flushDenied(context.Background(), now.Add(1100*time.Millisecond))
	ops := strings.Join(rec.Operations(), " ")
	if got := strings.Count(ops, "network.denied.summary"); got != 1 {
		t.Errorf("%d summaries, want 1: %s", got, ops)
	}
	if got := strings.Count(ops, "network.denied ") + strings.Count(ops+" ", "network.denied "); got == 0 {
		t.Errorf("no individual records")
	}
	var individual int
	var summary string
	for _, e := range rec.Events() {
		switch e.Operation {
		case "network.denied":
			individual++
			if !strings.Contains(e.Object, "a/id1") || !strings.Contains(e.Reason, "192.0.2.9:9999") {
				t.Errorf("record %+v does not name the container and flow", e)
			}
		case "network.denied.summary":
			summary = e.Reason
		}
	}
	if individual != 10 || !strings.HasPrefix(summary, "990 more denied packets") {
		t.Errorf("%d individual records (want the budget, 10), summary %q", individual, summary)
	}
	if _, ok := parsePacket([]byte{0x60, 0, 0}); ok {
		t.Errorf("an IPv6 or short packet parsed as IPv4")
	}
}
