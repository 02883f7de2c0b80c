package network

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	nflog "github.com/florianl/go-nflog/v2"

	"github.com/cmlproject/cml/internal/audit"
)

// Packet is one denied packet, as NFLOG delivered it.
type Packet struct {
	InIndex, OutIndex uint32
	Src, Dst          netip.Addr
	Protocol          byte
	SrcPort, DstPort  uint16
}

// parsePacket reads the IPv4 header (and the ports) of a logged packet.
func parsePacket(b []byte) (Packet, bool) {
	var p Packet
	if len(b) < 20 || b[0]>>4 != 4 {
		return p, false
	}
	ihl := int(b[0]&0x0f) * 4
	p.Protocol = b[9]
	p.Src = netip.AddrFrom4([4]byte(b[12:16]))
	p.Dst = netip.AddrFrom4([4]byte(b[16:20]))
	if (p.Protocol == 6 || p.Protocol == 17) && len(b) >= ihl+4 {
		p.SrcPort = binary.BigEndian.Uint16(b[ihl:])
		p.DstPort = binary.BigEndian.Uint16(b[ihl+2:])
	}
	return p, true
}

func (p Packet) String() string {
	switch p.Protocol {
	case 6, 17:
		proto := "tcp"
		if p.Protocol == 17 {
			proto = "udp"
		}
		return fmt.Sprintf("%s %s:%d -> %s:%d", proto, p.Src, p.SrcPort, p.Dst, p.DstPort)
	case 1:
		return fmt.Sprintf("icmp %s -> %s", p.Src, p.Dst)
	}
	return fmt.Sprintf("protocol %d %s -> %s", p.Protocol, p.Src, p.Dst)
}

// WatchDenied reads the NFLOG group of denied packets until ctx ends and
// turns them into audit records (network.denied), bounded per container.
func (st *Stage) WatchDenied(ctx context.Context) error {
	nf, err := nflog.Open(&nflog.Config{Group: st.settings.NflogGroup, Copymode: nflog.CopyPacket, Bufsize: 128})
	if err != nil {
		return fmt.Errorf("NFLOG group %d: %w", st.settings.NflogGroup, err)
	}
	// Under a flood the socket buffer may overflow: the count stays exact
	// in the kernel's counters, which the summaries carry.
	go func() { <-ctx.Done(); nf.Close() }()
	hook := func(a nflog.Attribute) int {
		if a.Payload == nil {
			return 0
		}
		p, ok := parsePacket(*a.Payload)
		if !ok {
			return 0
		}
		if a.InDev != nil {
			p.InIndex = *a.InDev
		}
		if a.OutDev != nil {
			p.OutIndex = *a.OutDev
		}
		st.denied1(ctx, p, time.Now())
		return 0
	}
	errfn := func(err error) int {
		if ctx.Err() != nil {
			return 1
		}
		st.Log.Debug("network: NFLOG", "err", err)
		return 0
	}
	if err := nf.RegisterWithErrorFunc(ctx, hook, errfn); err != nil {
		nf.Close()
		return err
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			st.flushDenied(ctx, now)
		}
	}
}

// denied1 records one denied packet, or counts it when the container's
// budget for this second is spent.
func (st *Stage) denied1(ctx context.Context, p Packet, now time.Time) {
	st.mu.Lock()
	id := st.byIndex[int(p.InIndex)]
	dir := "from"
	if id == "" {
		id, dir = st.byIndex[int(p.OutIndex)], "to"
	}
	if id == "" {
		st.mu.Unlock()
		return
	}
	r := st.running[id]
	name := r.rec.Name
	peer := ""
	if dir == "from" && p.OutIndex != 0 {
		if other := st.byIndex[int(p.OutIndex)]; other != "" {
			peer = " to container " + st.running[other].rec.Name
		}
	}
	if dir == "to" && p.InIndex != 0 {
		if other := st.byIndex[int(p.InIndex)]; other != "" {
			peer = " from container " + st.running[other].rec.Name
		}
	}
	st.mu.Unlock()
	if !st.denied.Allow(id, name, now) {
		return
	}
	what := "outgoing"
	if dir == "to" {
		what = "incoming"
	}
	st.record(ctx, audit.Event{Type: "network", Operation: "network.denied", Object: name + "/" + id, Outcome: audit.Failure,
		Reason: fmt.Sprintf("%s packet %s%s matches no allowed flow", what, p, peer)})
}

// flushDenied writes one summary per container whose denied packets were
// counted but not recorded one by one.
func (st *Stage) flushDenied(ctx context.Context, now time.Time) {
	for _, s := range st.denied.Flush(now) {
		c, _ := st.fw.counters(s.Key)
		st.record(ctx, audit.Event{Type: "network", Operation: "network.denied.summary", Object: s.Label + "/" + s.Key, Outcome: audit.Failure,
			Reason: fmt.Sprintf("%d more denied packets not recorded one by one (limit %d per second); the kernel has dropped %d packets of this container since its start", s.N, st.raw.GetDeniedEventsPerSecond(), c.droppedPackets)})
	}
}

func (st *Stage) record(ctx context.Context, e audit.Event) {
	if st.Audit == nil {
		return
	}
	if err := st.Audit.Record(ctx, e); err != nil {
		st.Log.Error("network: audit", "err", err)
	}
}
