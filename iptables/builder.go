package iptables

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
)

// Chain names, the same as Istio's so that Istio's tooling (and a cleanup by
// either implementation) recognises them.
const (
	ChainInbound    = "ISTIO_INBOUND"
	ChainRedirect   = "ISTIO_REDIRECT"
	ChainInRedirect = "ISTIO_IN_REDIRECT"
	ChainOutput     = "ISTIO_OUTPUT"
	ChainOutputDNS  = "ISTIO_OUTPUT_DNS"
	ChainDivert     = "ISTIO_DIVERT"
	ChainTProxy     = "ISTIO_TPROXY"
	ChainDrop       = "ISTIO_DROP"
)

const (
	// dnsProxyPort is where the agent's DNS proxy listens (fixed in Istio).
	dnsProxyPort = "15053"
	// outboundMark marks the proxy's own loopback traffic in TPROXY mode so
	// that it is not diverted back to the proxy.
	outboundMark = "1338"
)

// Build turns cfg into the rules per IP family, in the order Istio's
// istio-iptables builds them (capture/run.go), so that the restore input has
// the same rules per chain with the same effect. It does no I/O: it runs on
// every pod start and in dry runs.
func Build(cfg *Config) (*Plan, error) {
	if cfg == nil {
		return nil, errors.New("iptables: build: nil config")
	}
	if err := checkBuildable(cfg); err != nil {
		return nil, fmt.Errorf("iptables: build: %w", err)
	}
	b := &builder{cfg: cfg, ipv6: cfg.EnableIPv6}
	b.v4 = make([]Rule, 0, 32)
	if b.ipv6 {
		b.v6 = make([]Rule, 0, 32)
	}
	b.build()

	plan := &Plan{V4: &Ruleset{Family: IPv4, Rules: b.v4}}
	if b.ipv6 {
		plan.V6 = &Ruleset{Family: IPv6, Rules: b.v6}
		plan.LoopbackAddrs = []netip.Prefix{passthroughV6}
	}
	if cfg.Mode == ModeTPROXY {
		plan.Routes = append(plan.Routes, PolicyRoute{Family: IPv4, Mark: cfg.InboundTProxyMark, Table: cfg.InboundTProxyRouteTable})
		if b.ipv6 {
			plan.Routes = append(plan.Routes, PolicyRoute{Family: IPv6, Mark: cfg.InboundTProxyMark, Table: cfg.InboundTProxyRouteTable})
		}
	}
	return plan, nil
}

// checkBuildable catches a Config that did not come through ParseConfig
// (for example one built in code by proxy mode) with values that would
// render a broken restore input.
func checkBuildable(cfg *Config) error {
	for _, p := range []struct {
		name string
		v    uint16
	}{
		{"ProxyPort (-p/--envoy-port)", cfg.ProxyPort},
		{"InboundCapturePort (-z/--inbound-capture-port)", cfg.InboundCapturePort},
		{"InboundTunnelPort (-e/--inbound-tunnel-port)", cfg.InboundTunnelPort},
	} {
		if p.v == 0 {
			return fmt.Errorf("%s is 0: set a port between 1 and 65535", p.name)
		}
	}
	switch cfg.Mode {
	case ModeRedirect, ModeTPROXY, "":
	default:
		return fmt.Errorf("Mode (-m/--istio-inbound-interception-mode) %q: want REDIRECT or TPROXY", cfg.Mode)
	}
	if !cfg.HostIPv4LoopbackCIDR.IsValid() || !cfg.HostIPv4LoopbackCIDR.Addr().Is4() {
		return fmt.Errorf("HostIPv4LoopbackCIDR (ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR) %v: want an IPv4 loopback CIDR such as 127.0.0.1/32", cfg.HostIPv4LoopbackCIDR)
	}
	if len(cfg.ProxyUIDs) == 0 {
		return errors.New("ProxyUIDs (-u/--proxy-uid) is empty: the proxy's own traffic would loop back into it")
	}
	return nil
}

var (
	passthroughV6 = netip.MustParsePrefix("::6/128")
)

// familyMask says which families a rule is recorded for.
type familyMask uint8

const (
	onlyV4 familyMask = 1 << iota
	onlyV6
	both = onlyV4 | onlyV6
)

// builder records rules per family in build order. Rules recorded for both
// families go to v6 only when IPv6 is enabled, as Istio's AppendRule does.
type builder struct {
	cfg    *Config
	ipv6   bool
	v4, v6 []Rule
}

// add records one rule; args is called once per family so rules can carry
// per-family addresses (Istio's AppendVersionedRule).
func (b *builder) add(fams familyMask, table, chain string, pos int, args func(Family) []string) {
	if fams&onlyV4 != 0 {
		b.v4 = append(b.v4, Rule{Table: table, Chain: chain, Pos: pos, Args: args(IPv4)})
	}
	if fams&onlyV6 != 0 && b.ipv6 {
		b.v6 = append(b.v6, Rule{Table: table, Chain: chain, Pos: pos, Args: args(IPv6)})
	}
}

// rule appends a rule with the same arguments in every family.
func (b *builder) rule(fams familyMask, table, chain string, args ...string) {
	b.add(fams, table, chain, 0, func(Family) []string { return args })
}

// insert records "-I chain pos" with the same arguments in every family.
func (b *builder) insert(fams familyMask, table, chain string, pos int, args ...string) {
	b.add(fams, table, chain, pos, func(Family) []string { return args })
}

// loopback is the family's "localhost" destination: the configured IPv4
// loopback CIDR, or ::1/128.
func (b *builder) loopback(f Family) string {
	if f == IPv6 {
		return "::1/128"
	}
	return b.cfg.HostIPv4LoopbackCIDR.String()
}

// passthrough is the source the proxy binds for inbound passthrough and
// agent probes: 127.0.0.6, or ::6.
func passthrough(f Family) string {
	if f == IPv6 {
		return "::6/128"
	}
	return "127.0.0.6/32"
}

func port(p uint16) string { return strconv.FormatUint(uint64(p), 10) }

// networkRange is the per-family half of an outbound CIDR list.
type networkRange struct {
	wildcard bool
	cidrs    []netip.Prefix
	loopback bool
}

func splitFamilies(all bool, cidrs []netip.Prefix) (v4, v6 networkRange) {
	if all {
		return networkRange{wildcard: true}, networkRange{wildcard: true}
	}
	for _, c := range cidrs {
		r := &v6
		if c.Addr().Is4() {
			r = &v4
		}
		r.cidrs = append(r.cidrs, c)
		if c.Addr().IsLoopback() {
			r.loopback = true
		}
	}
	return v4, v6
}

// build emits the rules in Istio's order; the step numbers are those of the
// reference's rule-order description.
func (b *builder) build() {
	cfg := b.cfg
	tproxy := cfg.Mode == ModeTPROXY
	v4Include, v6Include := splitFamilies(cfg.OutboundIPRangesAll, cfg.OutboundIPRangesInclude)
	v4Exclude, v6Exclude := splitFamilies(false, cfg.OutboundIPRangesExclude)
	redirectDNS := cfg.dnsCaptureEnabled()
	tunnel := port(cfg.InboundTunnelPort)

	// 1. Excluded interfaces: neither direction is captured.
	for _, nic := range cfg.ExcludeInterfaces {
		b.rule(both, "nat", "PREROUTING", "-i", nic, "-j", "RETURN")
		b.rule(both, "nat", "OUTPUT", "-o", nic, "-j", "RETURN")
	}
	if tproxy {
		for _, nic := range cfg.ExcludeInterfaces {
			b.rule(both, "mangle", "PREROUTING", "-i", nic, "-j", "RETURN")
			b.rule(both, "mangle", "OUTPUT", "-o", nic, "-j", "RETURN")
		}
	}

	// 2. Kube virtual interfaces are not captured as inbound.
	for _, nic := range cfg.KubeVirtInterfaces {
		b.insert(both, "nat", "PREROUTING", 1, "-i", nic, "-j", "RETURN")
	}

	// 3. Drop conntrack-INVALID packets instead of letting them reset connections.
	if cfg.DropInvalid {
		b.rule(both, "mangle", "PREROUTING", "-m", "conntrack", "--ctstate", "INVALID", "-j", ChainDrop)
		b.rule(both, "mangle", ChainDrop, "-j", "DROP")
	}

	// 4. The HBONE tunnel port is never captured.
	b.rule(both, "nat", ChainInbound, "-p", "tcp", "--dport", tunnel, "-j", "RETURN")

	// 5. The redirect targets.
	b.rule(both, "nat", ChainRedirect, "-p", "tcp", "-j", "REDIRECT", "--to-ports", port(cfg.ProxyPort))
	b.rule(both, "nat", ChainInRedirect, "-p", "tcp", "-j", "REDIRECT", "--to-ports", port(cfg.InboundCapturePort))

	// 6. Inbound capture.
	b.inbound(tproxy)

	// 7. Every outbound packet goes through ISTIO_OUTPUT.
	b.rule(both, "nat", "OUTPUT", "-j", ChainOutput)

	// 8. Outbound ports never captured (before the redirect-to-self rules).
	for _, p := range cfg.OutboundPortsExclude {
		b.rule(both, "nat", ChainOutput, "-p", "tcp", "--dport", port(p), "-j", "RETURN")
		b.rule(both, "nat", ChainOutput, "-p", "udp", "--dport", port(p), "-j", "RETURN")
	}

	// 9. Inbound passthrough and agent probes come from 127.0.0.6 (::6).
	b.add(both, "nat", ChainOutput, 0, func(f Family) []string {
		return []string{"-o", "lo", "-s", passthrough(f), "-j", "RETURN"}
	})

	// 10 and 11. The proxy's own traffic: its calls back to this pod through a
	// service VIP go to inbound; the app's loopback traffic is left alone
	// (unless a loopback CIDR is explicitly captured); the rest of the
	// proxy's traffic is never captured.
	loopbackIncluded := v4Include.loopback || v6Include.loopback
	for _, uid := range cfg.ProxyUIDs {
		b.ownerRules("--uid-owner", uid, redirectDNS, redirectDNS, loopbackIncluded)
	}
	for _, gid := range cfg.ProxyGIDs {
		// Istio's GID rule never gets the port-53 exemption on the redirect
		// to inbound (only the UID rule does); kept for identical rules.
		b.ownerRules("--gid-owner", gid, false, redirectDNS, loopbackIncluded)
	}

	// 12. Owner groups.
	if cfg.OwnerGroupsInclude != nil {
		args := make([]string, 0, 5*len(cfg.OwnerGroupsInclude)+2)
		for _, g := range cfg.OwnerGroupsInclude {
			args = append(args, "-m", "owner", "!", "--gid-owner", g)
		}
		b.rule(both, "nat", ChainOutput, append(args, "-j", "RETURN")...)
	} else {
		for _, g := range cfg.OwnerGroupsExclude {
			b.rule(both, "nat", ChainOutput, "-m", "owner", "--gid-owner", g, "-j", "RETURN")
		}
	}

	// 13. DNS capture.
	if redirectDNS {
		b.dns()
	}

	// 14. Traffic to localhost is never captured.
	b.add(both, "nat", ChainOutput, 0, func(f Family) []string {
		return []string{"-d", b.loopback(f), "-j", "RETURN"}
	})

	// 15. Excluded CIDRs, before the inclusions.
	for _, c := range v4Exclude.cidrs {
		b.rule(onlyV4, "nat", ChainOutput, "-d", c.String(), "-j", "RETURN")
	}
	for _, c := range v6Exclude.cidrs {
		b.rule(onlyV6, "nat", ChainOutput, "-d", c.String(), "-j", "RETURN")
	}

	// 16. Outbound ports always captured.
	for _, p := range cfg.OutboundPortsInclude {
		b.rule(both, "nat", ChainOutput, "-p", "tcp", "--dport", port(p), "-j", ChainRedirect)
	}

	// 17. Included CIDRs (or everything), and kube virtual interfaces treated as outbound.
	b.outboundInclude(onlyV4, v4Include)
	b.outboundInclude(onlyV6, v6Include)

	// 18. TPROXY marks and the exemptions at the top of mangle ISTIO_INBOUND.
	if tproxy {
		b.tproxyTail()
	}
}

// inbound is step 6: the jump from PREROUTING and the per-port rules, in nat
// for REDIRECT or in mangle for TPROXY.
func (b *builder) inbound(tproxy bool) {
	cfg := b.cfg
	if !cfg.InboundPortsAll && len(cfg.InboundPorts) == 0 {
		return
	}
	table := "nat"
	if tproxy {
		mark := strconv.FormatUint(uint64(cfg.InboundTProxyMark), 10)
		b.rule(both, "mangle", ChainDivert, "-j", "MARK", "--set-mark", mark)
		b.rule(both, "mangle", ChainDivert, "-j", "ACCEPT")
		b.add(both, "mangle", ChainTProxy, 0, func(f Family) []string {
			return []string{"!", "-d", b.loopback(f), "-p", "tcp", "-j", "TPROXY",
				"--tproxy-mark", mark + "/0xffffffff", "--on-port", port(cfg.InboundCapturePort)}
		})
		table = "mangle"
	}
	b.rule(both, table, "PREROUTING", "-p", "tcp", "-j", ChainInbound)

	if cfg.InboundPortsAll {
		for _, p := range cfg.InboundPortsExclude {
			b.rule(both, table, ChainInbound, "-p", "tcp", "--dport", port(p), "-j", "RETURN")
		}
		if tproxy {
			b.rule(both, "mangle", ChainInbound, "-p", "tcp", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", ChainDivert)
			b.rule(both, "mangle", ChainInbound, "-p", "tcp", "-j", ChainTProxy)
		} else {
			b.rule(both, "nat", ChainInbound, "-p", "tcp", "-j", ChainInRedirect)
		}
		return
	}
	for _, p := range cfg.InboundPorts {
		if tproxy {
			b.rule(both, "mangle", ChainInbound, "-p", "tcp", "--dport", port(p), "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", ChainDivert)
			b.rule(both, "mangle", ChainInbound, "-p", "tcp", "--dport", port(p), "-j", ChainTProxy)
		} else {
			b.rule(both, "nat", ChainInbound, "-p", "tcp", "--dport", port(p), "-j", ChainInRedirect)
		}
	}
}

// ownerRules is steps 10 and 11 for one uid or gid (match is --uid-owner or
// --gid-owner).
func (b *builder) ownerRules(match, id string, dnsOnRedirect, dnsOnLoopback, loopbackIncluded bool) {
	tunnel := port(b.cfg.InboundTunnelPort)
	b.add(both, "nat", ChainOutput, 0, func(f Family) []string {
		if dnsOnRedirect {
			// Keep the agent's DNS (port 53) away from the inbound listener.
			return []string{"-o", "lo", "!", "-d", b.loopback(f), "-p", "tcp",
				"-m", "multiport", "!", "--dports", "53," + tunnel,
				"-m", "owner", match, id, "-j", ChainInRedirect}
		}
		return []string{"-o", "lo", "!", "-d", b.loopback(f), "-p", "tcp",
			"!", "--dport", tunnel, "-m", "owner", match, id, "-j", ChainInRedirect}
	})
	if !loopbackIncluded {
		if dnsOnLoopback {
			// TCP DNS to a resolver on localhost must still reach the DNS proxy.
			b.rule(both, "nat", ChainOutput, "-o", "lo", "-p", "tcp", "!", "--dport", "53",
				"-m", "owner", "!", match, id, "-j", "RETURN")
		} else {
			b.rule(both, "nat", ChainOutput, "-o", "lo", "-m", "owner", "!", match, id, "-j", "RETURN")
		}
	}
	b.rule(both, "nat", ChainOutput, "-m", "owner", match, id, "-j", "RETURN")
}

// dns is step 13: redirect port 53 to the DNS proxy (only the resolv.conf
// servers unless capture-all) and split DNS into two conntrack zones so the
// proxy's upstream queries and the app's queries do not collide.
func (b *builder) dns() {
	cfg := b.cfg
	all := cfg.CaptureAllDNS
	b.rule(both, "raw", "OUTPUT", "-j", ChainOutputDNS)
	// A family gets the nat jump only when it has something to redirect.
	if all || len(cfg.DNSServersV4) > 0 {
		b.rule(onlyV4, "nat", ChainOutput, "-j", ChainOutputDNS)
	}
	if all || len(cfg.DNSServersV6) > 0 {
		b.rule(onlyV6, "nat", ChainOutput, "-j", ChainOutputDNS)
	}
	// TCP uses --to-ports and UDP --to-port, as Istio writes them.
	for _, proto := range [...]struct{ name, to string }{{"tcp", "--to-ports"}, {"udp", "--to-port"}} {
		if all {
			b.rule(both, "nat", ChainOutputDNS, "-p", proto.name, "--dport", "53", "-j", "REDIRECT", proto.to, dnsProxyPort)
			continue
		}
		for _, s := range cfg.DNSServersV4 {
			b.rule(onlyV4, "nat", ChainOutputDNS, "-p", proto.name, "--dport", "53", "-d", hostPrefix(s), "-j", "REDIRECT", proto.to, dnsProxyPort)
		}
		for _, s := range cfg.DNSServersV6 {
			b.rule(onlyV6, "nat", ChainOutputDNS, "-p", proto.name, "--dport", "53", "-d", hostPrefix(s), "-j", "REDIRECT", proto.to, dnsProxyPort)
		}
	}

	// Conntrack zones: the proxy's queries to upstream resolvers in zone 1,
	// its answers to the app in zone 2.
	for _, owner := range [...]struct {
		match string
		ids   []string
	}{{"--uid-owner", cfg.ProxyUIDs}, {"--gid-owner", cfg.ProxyGIDs}} {
		for _, id := range owner.ids {
			b.rule(both, "raw", ChainOutputDNS, "-p", "udp", "--dport", "53", "-m", "owner", owner.match, id, "-j", "CT", "--zone", "1")
			b.rule(both, "raw", ChainOutputDNS, "-p", "udp", "--sport", dnsProxyPort, "-m", "owner", owner.match, id, "-j", "CT", "--zone", "2")
		}
	}
	// The app's queries in zone 2, resolver answers in zone 1. The raw
	// PREROUTING jump exists only in a family with rules behind it.
	if all {
		b.rule(both, "raw", "PREROUTING", "-j", ChainInbound)
		b.rule(both, "raw", ChainOutputDNS, "-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2")
		b.rule(both, "raw", ChainInbound, "-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1")
		return
	}
	for _, fam := range [...]struct {
		mask    familyMask
		servers []netip.Addr
	}{{onlyV4, cfg.DNSServersV4}, {onlyV6, cfg.DNSServersV6}} {
		if len(fam.servers) == 0 {
			continue
		}
		b.rule(fam.mask, "raw", "PREROUTING", "-j", ChainInbound)
		for _, s := range fam.servers {
			b.rule(fam.mask, "raw", ChainOutputDNS, "-p", "udp", "--dport", "53", "-d", hostPrefix(s), "-j", "CT", "--zone", "2")
			b.rule(fam.mask, "raw", ChainInbound, "-p", "udp", "--sport", "53", "-s", hostPrefix(s), "-j", "CT", "--zone", "1")
		}
	}
}

// hostPrefix renders a single address as a /32 or /128.
func hostPrefix(a netip.Addr) string {
	return netip.PrefixFrom(a, a.BitLen()).String()
}

// outboundInclude is step 17 for one family.
func (b *builder) outboundInclude(fam familyMask, r networkRange) {
	kvirt := b.cfg.KubeVirtInterfaces
	if r.wildcard {
		b.rule(fam, "nat", ChainOutput, "-j", ChainRedirect)
		for _, nic := range kvirt {
			b.insert(fam, "nat", "PREROUTING", 1, "-i", nic, "-j", ChainRedirect)
		}
		return
	}
	for _, c := range r.cidrs {
		for _, nic := range kvirt {
			b.insert(fam, "nat", "PREROUTING", 1, "-i", nic, "-d", c.String(), "-j", ChainRedirect)
		}
		b.rule(fam, "nat", ChainOutput, "-d", c.String(), "-j", ChainRedirect)
	}
}

// tproxyTail is step 18: keep the proxy's marks on the connection, stop the
// proxy's own traffic to the app from being diverted again, and let lo
// traffic that is not the proxy's through ISTIO_INBOUND untouched.
func (b *builder) tproxyTail() {
	cfg := b.cfg
	mark := strconv.FormatUint(uint64(cfg.InboundTProxyMark), 10)
	b.rule(both, "mangle", "PREROUTING", "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "CONNMARK", "--save-mark")
	b.rule(both, "mangle", "OUTPUT", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN")
	for _, owner := range [...]struct {
		match string
		ids   []string
	}{{"--uid-owner", cfg.ProxyUIDs}, {"--gid-owner", cfg.ProxyGIDs}} {
		for _, id := range owner.ids {
			b.add(both, "mangle", "OUTPUT", 0, func(f Family) []string {
				return []string{"!", "-d", b.loopback(f), "-p", "tcp", "-o", "lo",
					"-m", "owner", owner.match, id, "-j", "MARK", "--set-mark", outboundMark}
			})
		}
	}
	b.rule(both, "mangle", "OUTPUT", "-p", "tcp", "-m", "connmark", "--mark", mark, "-j", "CONNMARK", "--restore-mark")
	b.insert(both, "mangle", ChainInbound, 1, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN")
	b.add(both, "mangle", ChainInbound, 2, func(f Family) []string {
		return []string{"-p", "tcp", "-s", passthrough(f), "-i", "lo", "-j", "RETURN"}
	})
	b.insert(both, "mangle", ChainInbound, 3, "-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", outboundMark, "-j", "RETURN")
}
