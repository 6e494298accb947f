package iptables

import (
	"encoding/binary"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reading the policy routing state through a netlink dump costs no exec,
// which keeps re-runs and cleanups of REDIRECT pods (nothing to remove)
// cheap. Changes still go through "ip", whose messages users know.

const rtaTable = 15 // RTA_TABLE

func afOf(f Family) int {
	if f == IPv6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

// rtAttrs splits the route attributes after a fixed header of hdr bytes.
func rtAttrs(b []byte, hdr int) map[uint16][]byte {
	out := map[uint16][]byte{}
	if len(b) < hdr {
		return out
	}
	b = b[hdr:]
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b[0:2]))
		typ := binary.NativeEndian.Uint16(b[2:4]) &^ unix.NLA_F_NESTED
		if l < 4 || l > len(b) {
			break
		}
		out[typ] = b[4:l]
		al := (l + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1)
		if al > len(b) {
			break
		}
		b = b[al:]
	}
	return out
}

func dump(typ, family int) ([]syscall.NetlinkMessage, error) {
	raw, err := syscall.NetlinkRIB(typ, family)
	if err != nil {
		return nil, err
	}
	return syscall.ParseNetlinkMessage(raw)
}

// tableOf reads the table from the 8-bit header field or the 32-bit
// attribute that replaces it for tables above 255.
func tableOf(hdrTable uint8, attrs map[uint16][]byte, attr uint16) int {
	if v, ok := attrs[attr]; ok && len(v) >= 4 {
		return int(binary.NativeEndian.Uint32(v))
	}
	return int(hdrTable)
}

// policyRule is one policy routing rule as the kernel dumps it.
type policyRule struct {
	Pref  uint32
	Mark  uint32
	Table int
	// Plain is set when the rule has exactly the shape applyRoutes adds,
	// "from all fwmark M lookup T": a mark with a full mask and no other
	// selector (source, destination, tos, interface, uid, port, inversion,
	// suppressor). Any rule with more is someone else's.
	Plain bool
}

// policyRules dumps fam's policy rules. A family the kernel lacks has none.
func policyRules(fam Family) []policyRule {
	msgs, err := dump(unix.RTM_GETRULE, afOf(fam))
	if err != nil {
		return nil
	}
	var out []policyRule
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWRULE || len(m.Data) < 12 {
			continue
		}
		// struct fib_rule_hdr: family, dst_len, src_len, tos, table,
		// res1, res2, action, flags (u32).
		attrs := rtAttrs(m.Data, 12)
		pr := policyRule{Table: tableOf(m.Data[4], attrs, unix.FRA_TABLE)}
		if v, ok := attrs[unix.FRA_PRIORITY]; ok && len(v) >= 4 {
			pr.Pref = binary.NativeEndian.Uint32(v)
		}
		if v, ok := attrs[unix.FRA_FWMARK]; ok && len(v) >= 4 {
			pr.Mark = binary.NativeEndian.Uint32(v)
		}
		pr.Plain = pr.Mark != 0 && m.Data[1] == 0 && m.Data[2] == 0 && m.Data[3] == 0 &&
			m.Data[7] == unix.FR_ACT_TO_TBL && binary.NativeEndian.Uint32(m.Data[8:12])&unix.FIB_RULE_INVERT == 0
		for typ, v := range attrs {
			switch typ {
			case unix.FRA_TABLE, unix.FRA_PRIORITY, unix.FRA_FWMARK, unix.FRA_PROTOCOL:
			case unix.FRA_FWMASK, unix.FRA_SUPPRESS_PREFIXLEN:
				// Dumped always (suppressor: -1 when unset) or with the
				// mark (mask: all ones when none was given).
				if len(v) < 4 || binary.NativeEndian.Uint32(v) != 0xffffffff {
					pr.Plain = false
				}
			default:
				pr.Plain = false
			}
		}
		out = append(out, pr)
	}
	return out
}

// countFwmarkRules counts the plain "from all fwmark M lookup T" rules.
func countFwmarkRules(rt PolicyRoute) int {
	n := 0
	for _, pr := range policyRules(rt.Family) {
		if pr.Plain && pr.Mark == rt.Mark && pr.Table == rt.Table {
			n++
		}
	}
	return n
}

// hasLocalDefault reports whether table T holds "local default dev lo".
func hasLocalDefault(rt PolicyRoute) bool {
	msgs, err := dump(unix.RTM_GETROUTE, afOf(rt.Family))
	if err != nil {
		return false
	}
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWROUTE || len(m.Data) < unix.SizeofRtMsg {
			continue
		}
		// struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type
		if m.Data[1] != 0 || m.Data[7] != unix.RTN_LOCAL {
			continue
		}
		if tableOf(m.Data[4], rtAttrs(m.Data, unix.SizeofRtMsg), rtaTable) == rt.Table {
			return true
		}
	}
	return false
}

// hasLoopbackAddr reports whether lo carries the prefix.
func hasLoopbackAddr(p netip.Prefix) bool {
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		return false
	}
	addrs, err := lo.Addrs()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			ones, _ := n.Mask.Size()
			if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == p.Addr() && ones == p.Bits() {
				return true
			}
		}
	}
	return false
}

// hasLocalRoute reports whether the local table routes addr to this host.
// The kernel adds that route asynchronously after an IPv6 address.
func hasLocalRoute(addr netip.Addr) bool {
	fam := IPv4
	if addr.Is6() {
		fam = IPv6
	}
	msgs, err := dump(unix.RTM_GETROUTE, afOf(fam))
	if err != nil {
		return false
	}
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWROUTE || len(m.Data) < unix.SizeofRtMsg || m.Data[7] != unix.RTN_LOCAL {
			continue
		}
		if dst, ok := netip.AddrFromSlice(rtAttrs(m.Data, unix.SizeofRtMsg)[unix.RTA_DST]); ok && dst == addr {
			return true
		}
	}
	return false
}
