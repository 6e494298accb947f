package iptables

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// canonicalSpec rewrites a rule's arguments the way iptables-save prints
// them (legacy and nft print the same), so the plan can be compared with
// the kernel's state as text: generic matches first in the order -s, -d,
// -i, -o, -p; the implicit "-m tcp"/"-m udp" before protocol options;
// addresses with a prefix length; marks in hex; target options in their
// printed form. It covers every shape Build emits; anything else is kept as
// written, which at worst makes an identical state look different and costs
// one safe reconcile.
func canonicalSpec(args []string, fam Family) string {
	var generic [5][]string // -s -d -i -o -p, each with its "!" if negated
	var rest []string
	proto := ""
	for i := 0; i < len(args); i++ {
		neg := false
		a := args[i]
		if a == "!" && i+1 < len(args) {
			if slot := genericSlot(args[i+1]); slot >= 0 {
				neg = true
				i++
				a = args[i]
			} else {
				rest = append(rest, a)
				continue
			}
		}
		slot := genericSlot(a)
		if slot < 0 || i+1 >= len(args) {
			rest = append(rest, a)
			continue
		}
		i++
		val := args[i]
		switch slot {
		case 0, 1:
			val = canonicalAddr(val, fam)
		case 4:
			val = strings.ToLower(val)
			proto = val
		}
		var opt []string
		if neg {
			opt = append(opt, "!")
		}
		generic[slot] = append(opt, genericNames[slot], val)
	}

	out := make([]string, 0, len(args)+4)
	for _, g := range generic {
		out = append(out, g...)
	}
	// Options before the first -m/-j belong to the protocol's implicit match.
	seg, target := "", ""
	for i := 0; i < len(rest); i++ {
		a := rest[i]
		switch {
		case (a == "-m" || a == "--match") && i+1 < len(rest):
			i++
			seg = rest[i]
			out = append(out, "-m", seg)
			continue
		case (a == "-j" || a == "--jump") && i+1 < len(rest):
			i++
			target = rest[i]
			out = append(out, "-j", target)
			return strings.Join(append(out, canonicalTarget(target, rest[i+1:], fam)...), " ")
		}
		if seg == "" && proto != "" {
			seg = proto
			out = append(out, "-m", proto)
		}
		if (a == "--mark") && (seg == "mark" || seg == "connmark") && i+1 < len(rest) {
			i++
			out = append(out, a, hexMark(rest[i], false))
			continue
		}
		out = append(out, a)
	}
	return strings.Join(out, " ")
}

var genericNames = [5]string{"-s", "-d", "-i", "-o", "-p"}

func genericSlot(a string) int {
	switch a {
	case "-s", "--source", "--src":
		return 0
	case "-d", "--destination", "--dst":
		return 1
	case "-i", "--in-interface":
		return 2
	case "-o", "--out-interface":
		return 3
	case "-p", "--protocol":
		return 4
	}
	return -1
}

// canonicalAddr gives an address or prefix with its length, masked, as
// iptables-save prints it ("127.0.0.53" becomes "127.0.0.53/32").
func canonicalAddr(s string, fam Family) string {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return s
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	p = p.Masked()
	return ntop(p.Addr()) + "/" + strconv.Itoa(p.Bits())
}

// ntop prints an address as glibc's inet_ntop does, which iptables uses:
// like Go, except that an IPv6 address whose first 96 bits are zero (and
// the 7th group is not) is written IPv4-compatible, "::127.0.0.53".
func ntop(a netip.Addr) string {
	if a.Is6() && !a.Is4In6() {
		b := a.As16()
		if b[12]|b[13] != 0 && [12]byte(b[:12]) == [12]byte{} {
			return "::" + netip.AddrFrom4([4]byte(b[12:])).String()
		}
	}
	return a.String()
}

// hexMark prints "V[/M]" as iptables-save does: hex, the mask only when it
// is not all ones, or always when full is set.
func hexMark(s string, full bool) string {
	v, m, hasMask := strings.Cut(s, "/")
	val, err := strconv.ParseUint(v, 0, 32)
	if err != nil {
		return s
	}
	mask := uint64(0xffffffff)
	if hasMask {
		if mask, err = strconv.ParseUint(m, 0, 32); err != nil {
			return s
		}
	}
	if mask == 0xffffffff && !full {
		return fmt.Sprintf("0x%x", val)
	}
	return fmt.Sprintf("0x%x/0x%x", val, mask)
}

// canonicalTarget rewrites target options into their printed form.
func canonicalTarget(target string, opts []string, fam Family) []string {
	get := func(names ...string) (string, bool) {
		for i := 0; i < len(opts); i++ {
			for _, n := range names {
				if opts[i] == n {
					if i+1 < len(opts) && !strings.HasPrefix(opts[i+1], "--") {
						return opts[i+1], true
					}
					return "", true
				}
			}
		}
		return "", false
	}
	switch target {
	case "REDIRECT":
		if p, ok := get("--to-ports", "--to-port"); ok {
			return []string{"--to-ports", p}
		}
	case "MARK":
		if v, ok := get("--set-mark", "--set-xmark"); ok {
			return []string{"--set-xmark", hexMark(v, true)}
		}
	case "CONNMARK":
		for _, op := range []string{"--save-mark", "--restore-mark"} {
			if _, ok := get(op); ok {
				nf, ct := "0xffffffff", "0xffffffff"
				if m, ok := get("--mask"); ok {
					nf, ct = hexMark(m, false), hexMark(m, false)
				}
				if m, ok := get("--nfmask"); ok {
					nf = hexMark(m, false)
				}
				if m, ok := get("--ctmask"); ok {
					ct = hexMark(m, false)
				}
				return []string{op, "--nfmask", nf, "--ctmask", ct}
			}
		}
	case "TPROXY":
		port, _ := get("--on-port")
		ip, ok := get("--on-ip")
		if !ok {
			ip = "0.0.0.0"
			if fam == IPv6 {
				ip = "::"
			}
		}
		out := []string{"--on-port", port, "--on-ip", ip}
		if m, ok := get("--tproxy-mark"); ok {
			out = append(out, "--tproxy-mark", hexMark(m, true))
		}
		return out
	}
	return opts
}
