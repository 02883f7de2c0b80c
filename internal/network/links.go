package network

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// alias marks host links cmld made: "<table>:<container id>", so that
// links of containers that are gone can be found and removed after a
// crash.
func (f *firewall) alias(id string) string { return f.s.Table + ":" + id }

// linkName is the host side of container id's link when its config names
// none: "cml" and 12 hex digits of the id's SHA-256 (15 bytes, IFNAMSIZ),
// so that ids alike in their first digits get different names.
func linkName(id string) string {
	h := sha256.Sum256([]byte(id))
	return "cml" + hex.EncodeToString(h[:6])
}

// linkAddrs returns the host side's and the container's address of slot's
// /31 in prefix.
func linkAddrs(prefix netip.Prefix, slot uint32) (host, ctr netip.Addr, err error) {
	size := uint64(1) << (32 - prefix.Bits())
	if uint64(slot)*2+1 >= size {
		return host, ctr, fmt.Errorf("link_prefix %s has no room for container slot %d (%d links); choose a larger prefix", prefix, slot, size/2)
	}
	b := prefix.Addr().As4()
	base := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	mk := func(v uint32) netip.Addr {
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	return mk(base + 2*slot), mk(base + 2*slot + 1), nil
}

func randomMAC() net.HardwareAddr {
	m := make(net.HardwareAddr, 6)
	rand.Read(m)
	m[0] = m[0]&0xfe | 0x02 // unicast, locally administered
	return m
}

// linkSpec is one container link to make.
type linkSpec struct {
	Alias     string
	Host      string // host side name
	Inside    string // name inside the container
	MAC       net.HardwareAddr
	HostAddr  netip.Addr
	Addr      netip.Addr
	Configure bool
}

// makeLink creates the veth pair with one end in ns, addresses both ends
// (unless the config leaves the inside unconfigured) and routes the
// container through the host side. On error nothing is left.
func makeLink(ns *os.File, l linkSpec) (index int, err error) {
	veth := &netlink.Veth{
		LinkAttrs:        netlink.LinkAttrs{Name: l.Host, Alias: l.Alias},
		PeerName:         l.Inside,
		PeerNamespace:    netlink.NsFd(int(ns.Fd())),
		PeerHardwareAddr: l.MAC,
	}
	if err := netlink.LinkAdd(veth); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return 0, fmt.Errorf("host interface %s exists already", l.Host)
		}
		return 0, fmt.Errorf("create link %s: %w", l.Host, err)
	}
	defer func() {
		if err != nil {
			netlink.LinkDel(veth)
		}
	}()
	host, err := netlink.LinkByName(l.Host)
	if err != nil {
		return 0, err
	}
	if err := netlink.LinkSetAlias(host, l.Alias); err != nil {
		return 0, fmt.Errorf("link %s: alias: %w", l.Host, err)
	}
	// No IPv6 on the link (the policy is IPv4), and the host routes
	// what arrives on it: forwarding is enabled per interface, not for
	// the whole host.
	sysctl("ipv6/conf/"+l.Host+"/disable_ipv6", "1")
	if err := sysctl("ipv4/conf/"+l.Host+"/forwarding", "1"); err != nil {
		return 0, fmt.Errorf("link %s: enable forwarding: %w", l.Host, err)
	}
	if err := netlink.AddrAdd(host, &netlink.Addr{IPNet: &net.IPNet{IP: l.HostAddr.AsSlice(), Mask: net.CIDRMask(31, 32)}}); err != nil {
		return 0, fmt.Errorf("link %s: address: %w", l.Host, err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return 0, fmt.Errorf("link %s: up: %w", l.Host, err)
	}
	h, err := netlink.NewHandleAt(netns.NsHandle(int(ns.Fd())))
	if err != nil {
		return 0, err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		return 0, fmt.Errorf("loopback: %w", err)
	}
	if !l.Configure {
		return host.Attrs().Index, nil
	}
	in, err := h.LinkByName(l.Inside)
	if err != nil {
		return 0, err
	}
	if err := h.AddrAdd(in, &netlink.Addr{IPNet: &net.IPNet{IP: l.Addr.AsSlice(), Mask: net.CIDRMask(31, 32)}}); err != nil {
		return 0, fmt.Errorf("container address: %w", err)
	}
	if err := h.LinkSetUp(in); err != nil {
		return 0, err
	}
	if err := h.RouteAdd(&netlink.Route{LinkIndex: in.Attrs().Index, Gw: l.HostAddr.AsSlice()}); err != nil {
		return 0, fmt.Errorf("container default route: %w", err)
	}
	return host.Attrs().Index, nil
}

// deleteLinks removes the host links of container id (by alias, so that a
// renamed or leftover link is found too). Deleting one end of a veth
// deletes the other.
func deleteLinks(alias string) error {
	links, err := linkList(nil)
	if err != nil {
		return err
	}
	var errs []error
	for _, l := range links {
		if l.Attrs().Alias == alias {
			if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
				errs = append(errs, fmt.Errorf("delete %s: %w", l.Attrs().Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// linkList lists links; a dump the kernel interrupted (links changed
// meanwhile, as concurrent starts do) is read again.
func linkList(h *netlink.Handle) ([]netlink.Link, error) {
	for i := 0; ; i++ {
		var links []netlink.Link
		var err error
		if h == nil {
			links, err = netlink.LinkList()
		} else {
			links, err = h.LinkList()
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) || i == 9 {
			return links, err
		}
	}
}

// strayLinks lists host links made by cmld for containers not in keep.
func strayLinks(prefix string, keep map[string]bool) []netlink.Link {
	links, _ := linkList(nil)
	var out []netlink.Link
	for _, l := range links {
		if id, ok := strings.CutPrefix(l.Attrs().Alias, prefix); ok && !keep[id] {
			out = append(out, l)
		}
	}
	return out
}

// findHostIface finds a host interface by name or MAC address.
func findHostIface(netif string) (netlink.Link, error) {
	if mac, err := net.ParseMAC(netif); err == nil {
		links, err := linkList(nil)
		if err != nil {
			return nil, err
		}
		for _, l := range links {
			if strings.EqualFold(l.Attrs().HardwareAddr.String(), mac.String()) {
				return l, nil
			}
		}
		return nil, fmt.Errorf("no interface has MAC %s", netif)
	}
	l, err := netlink.LinkByName(netif)
	if err != nil {
		return nil, fmt.Errorf("interface %s does not exist", netif)
	}
	return l, nil
}

// assignedIface is a host interface moved into a container.
type assignedIface struct {
	Netif string `json:"netif"` // as the config names it
	Name  string `json:"name"`  // its name on the host
	MAC   string `json:"mac"`
}

// moveIn moves a host interface into ns and brings it up there.
func moveIn(ns *os.File, l netlink.Link) error {
	if err := netlink.LinkSetNsFd(l, int(ns.Fd())); err != nil {
		return fmt.Errorf("move %s into the container: %w", l.Attrs().Name, err)
	}
	h, err := netlink.NewHandleAt(netns.NsHandle(int(ns.Fd())))
	if err != nil {
		return err
	}
	defer h.Close()
	in, err := h.LinkByName(l.Attrs().Name)
	if err == nil {
		err = h.LinkSetUp(in)
	}
	return err
}

// moveOut moves an assigned interface from ns back to the host (found by
// MAC, as the container may have renamed it) under its host name, down.
func moveOut(ns, host *os.File, a assignedIface) error {
	h, err := netlink.NewHandleAt(netns.NsHandle(int(ns.Fd())))
	if err != nil {
		return err
	}
	defer h.Close()
	links, err := linkList(h)
	if err != nil {
		return err
	}
	for _, l := range links {
		if !strings.EqualFold(l.Attrs().HardwareAddr.String(), a.MAC) {
			continue
		}
		h.LinkSetDown(l)
		if l.Attrs().Name != a.Name {
			h.LinkSetName(l, a.Name)
		}
		if err := h.LinkSetNsFd(l, int(host.Fd())); err != nil {
			return fmt.Errorf("move %s back to the host: %w", a.Name, err)
		}
		return nil
	}
	return nil // gone with the namespace, or never there
}
