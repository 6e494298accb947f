package iptables

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/user"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
)

// DefaultResolvConf is where the pod's resolvers are read from.
const DefaultResolvConf = "/etc/resolv.conf"

// maxOwnerGroups bounds ISTIO_OUTBOUND_OWNER_GROUPS: all groups go into one
// rule of "-m owner ! --gid-owner G" matches, and kernels cap the matches
// per rule (Istio's limit).
const maxOwnerGroups = 64

// Inputs is everything ParseConfig reads, injectable for tests. Zero
// function fields mean the real thing (os.LookupEnv, net.InterfaceAddrs,
// os/user).
type Inputs struct {
	// Flags are the flags given on the command line, by long name, with
	// their raw values (see ChangedFlags). They win over env vars.
	Flags map[string]string
	// LookupEnv reads an env var.
	LookupEnv func(string) (string, bool)
	// InterfaceAddrs lists the pod's addresses, to decide on IPv6 rules.
	InterfaceAddrs func() ([]net.Addr, error)
	// LookupUserUID resolves ENVOY_USER to a uid.
	LookupUserUID func(name string) (string, error)
	// ResolvConf is the resolv.conf path. Default DefaultResolvConf.
	ResolvConf string
}

func (in *Inputs) fill() {
	if in.LookupEnv == nil {
		in.LookupEnv = os.LookupEnv
	}
	if in.InterfaceAddrs == nil {
		in.InterfaceAddrs = net.InterfaceAddrs
	}
	if in.LookupUserUID == nil {
		in.LookupUserUID = func(name string) (string, error) {
			u, err := user.Lookup(name)
			if err != nil {
				return "", err
			}
			return u.Uid, nil
		}
	}
	if in.ResolvConf == "" {
		in.ResolvConf = DefaultResolvConf
	}
}

// setting is one raw value and where it came from, for error messages.
type setting struct {
	value  string
	source string // "-p/--envoy-port" or "env INBOUND_CAPTURE_PORT"
	set    bool   // false: the default applies
}

// parser collects every error so one run reports all bad inputs.
type parser struct {
	in    Inputs
	specs map[string]FlagSpec
	errs  []error
}

func (p *parser) get(name string) setting {
	spec := p.specs[name]
	if v, ok := p.in.Flags[name]; ok {
		src := "--" + name
		if spec.Shorthand != "" {
			src = "-" + spec.Shorthand + "/" + src
		}
		return setting{value: v, source: src, set: true}
	}
	return p.env(spec.Env...)
}

// env reads the last non-empty env var of names: Istio sets the flag from
// its own env var and then again from each alias (pkg/flag AdditionalEnv),
// so ISTIO_META_DNS_CAPTURE overrides REDIRECT_DNS. An env var set to "" is
// treated as unset, so the default applies.
func (p *parser) env(names ...string) setting {
	for i := len(names) - 1; i >= 0; i-- {
		e := names[i]
		if v, ok := p.in.LookupEnv(e); ok && v != "" {
			return setting{value: v, source: "env " + e, set: true}
		}
	}
	src := ""
	if len(names) > 0 {
		src = "env " + names[0]
	}
	return setting{source: src}
}

func (p *parser) fail(s setting, format string, args ...any) {
	p.errs = append(p.errs, fmt.Errorf("%s %q: %s", s.source, s.value, fmt.Sprintf(format, args...)))
}

// list splits a comma-separated value, dropping empty items as Istio does
// ("6000,7000," is two ports).
func list(v string) []string {
	var out []string
	for _, item := range strings.Split(v, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

func (p *parser) port(name string, def uint16) uint16 {
	s := p.get(name)
	if !s.set {
		return def
	}
	v, err := parsePort(strings.TrimSpace(s.value))
	if err != nil {
		p.fail(s, "%v", err)
	}
	return v
}

func parsePort(v string) (uint16, error) {
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("port %q is not a number: use a port between 1 and 65535", v)
	}
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %d is out of range: use a port between 1 and 65535", n)
	}
	return uint16(n), nil
}

func (p *parser) ports(s setting) []uint16 {
	var out []uint16
	for _, item := range list(s.value) {
		v, err := parsePort(item)
		if err != nil {
			p.fail(s, "%v", err)
			continue
		}
		out = append(out, v)
	}
	return out
}

// wildcardPorts parses "*" or a port list.
func (p *parser) wildcardPorts(name string) (all bool, ports []uint16) {
	s := p.get(name)
	if strings.TrimSpace(s.value) == "*" {
		return true, nil
	}
	return false, p.ports(s)
}

func (p *parser) cidrs(s setting) []netip.Prefix {
	var out []netip.Prefix
	for _, item := range list(s.value) {
		c, err := netip.ParsePrefix(item)
		if err != nil {
			if a, aerr := netip.ParseAddr(item); aerr == nil {
				p.fail(s, "%q is an address, not a CIDR: write %s", item, netip.PrefixFrom(a, a.BitLen()))
			} else {
				p.fail(s, "%q is not a CIDR such as 10.0.0.0/8 or 2001:db8::/32", item)
			}
			continue
		}
		out = append(out, c)
	}
	return out
}

func (p *parser) boolean(name string) bool {
	s := p.get(name)
	return p.parseBool(s)
}

func (p *parser) parseBool(s setting) bool {
	if !s.set {
		return false
	}
	v, err := strconv.ParseBool(strings.TrimSpace(s.value))
	if err != nil {
		p.fail(s, "not a boolean: use true or false")
	}
	return v
}

// ids parses a uid or gid list: numbers only, since they go into
// "-m owner --uid-owner" of rules.
func (p *parser) ids(s setting, what string) []string {
	var out []string
	for _, item := range list(s.value) {
		if _, err := strconv.ParseUint(item, 10, 32); err != nil {
			p.fail(s, "%s %q is not a number: give numeric %ss", what, item, what)
			continue
		}
		out = append(out, item)
	}
	return out
}

func (p *parser) interfaces(name string) []string {
	s := p.get(name)
	var out []string
	for _, item := range strings.Split(s.value, ",") {
		if item == "" {
			continue
		}
		if err := validInterfaceName(item); err != nil {
			p.fail(s, "%v", err)
			continue
		}
		out = append(out, item)
	}
	return out
}

// validInterfaceName accepts what Linux accepts as a name (1 to 15 bytes,
// no whitespace, '/' or ':') and refuses what could be read as an iptables
// argument or break restore input: a leading '-' or '!', quotes,
// backslashes and control characters. A trailing '+' is iptables' wildcard
// and allowed.
func validInterfaceName(n string) error {
	switch {
	case len(n) > 15:
		return fmt.Errorf("interface name %q is longer than 15 characters", n)
	case n == "." || n == "..":
		return fmt.Errorf("%q is not an interface name", n)
	case n[0] == '-' || n[0] == '!':
		return fmt.Errorf("interface name %q starts with %q: it would be read as an iptables option", n, n[0])
	}
	for _, r := range n {
		switch {
		case r <= ' ' || r == 0x7f || r > 0x7e:
			return fmt.Errorf("interface name %q contains whitespace or a non-printable character", n)
		case r == '/' || r == ':' || r == '"' || r == '\'' || r == '\\' || r == '#':
			return fmt.Errorf("interface name %q contains %q, which interface names cannot contain", n, r)
		}
	}
	return nil
}

// validGroup accepts a gid or a group name safe to pass to --gid-owner.
func validGroup(g string) error {
	if g[0] == '-' || g[0] == '!' {
		return fmt.Errorf("group %q starts with %q: it would be read as an iptables option", g, g[0])
	}
	for _, r := range g {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.' || r == '$') {
			return fmt.Errorf("group %q contains %q: use a gid or a group name of letters, digits, '.', '_' and '-'", g, r)
		}
	}
	return nil
}

func (p *parser) groups(s setting) []string {
	var out []string
	for _, g := range list(s.value) {
		if err := validGroup(g); err != nil {
			p.fail(s, "%v", err)
			continue
		}
		out = append(out, g)
	}
	return out
}

// ParseConfig turns the istio-iptables command line and environment into a
// Config, with Istio's precedence (flag, then env var, then default) and its
// derived inputs: the default proxy uid from ENVOY_USER, IPv6 from the
// pod's addresses, DNS servers from resolv.conf. Every bad value is
// reported, each naming its flag or env var. It does not touch iptables.
func ParseConfig(in Inputs, log *zap.Logger) (*Config, error) {
	// Only the real address source is read inside --network-namespace;
	// tests inject theirs.
	hostAddrs := in.InterfaceAddrs == nil
	in.fill()
	if log == nil {
		log = zap.NewNop()
	}
	p := &parser{in: in, specs: map[string]FlagSpec{}}
	for _, s := range FlagSpecs() {
		if s.Name != "" {
			p.specs[s.Name] = s
		}
	}
	for name := range in.Flags {
		if _, ok := p.specs[name]; !ok {
			return nil, fmt.Errorf("unknown istio-iptables flag --%s", name)
		}
	}

	cfg := DefaultConfig()
	cfg.ProxyPort = p.port(FlagEnvoyPort, cfg.ProxyPort)
	cfg.InboundCapturePort = p.port(FlagInboundCapturePort, cfg.InboundCapturePort)
	cfg.InboundTunnelPort = p.port(FlagInboundTunnelPort, cfg.InboundTunnelPort)
	cfg.ProbePort = p.port(FlagProbePort, cfg.ProbePort)

	p.parseOwners(&cfg)

	if s := p.get(FlagInterceptionMode); s.set {
		switch v := InterceptMode(strings.TrimSpace(s.value)); v {
		case "", ModeRedirect, ModeTPROXY:
			if v != "" {
				cfg.Mode = v
			}
		default:
			p.fail(s, "unknown mode: use REDIRECT or TPROXY")
		}
	}

	cfg.InboundPortsAll, cfg.InboundPorts = p.wildcardPorts(FlagInboundPorts)
	excl := p.get(FlagLocalExcludePorts)
	cfg.InboundPortsExclude = p.ports(excl)
	if len(cfg.InboundPortsExclude) > 0 && !cfg.InboundPortsAll {
		log.Warn("inbound port exclusions apply only when all inbound ports are captured (--istio-inbound-ports '*'); ignoring them",
			zap.String("source", excl.source))
	}
	cfg.ExcludeInterfaces = p.interfaces(FlagExcludeInterfaces)
	cfg.KubeVirtInterfaces = p.interfaces(FlagKubeVirtInterfaces)

	if s := p.get(FlagServiceCIDR); strings.TrimSpace(s.value) == "*" {
		cfg.OutboundIPRangesAll = true
	} else {
		cfg.OutboundIPRangesInclude = p.cidrs(s)
	}
	if s := p.get(FlagServiceExcludeCIDR); strings.TrimSpace(s.value) == "*" {
		p.fail(s, `"*" would exclude every destination: list the CIDRs to exclude, or use --istio-service-cidr '' to capture no outbound traffic`)
	} else {
		cfg.OutboundIPRangesExclude = p.cidrs(s)
	}
	cfg.OutboundPortsInclude = p.ports(p.get(FlagOutboundPorts))
	cfg.OutboundPortsExclude = p.ports(p.get(FlagLocalOutboundPortsExcl))

	if s := p.get(FlagTProxyMark); s.set {
		v, err := strconv.ParseUint(strings.TrimSpace(s.value), 10, 32)
		if err != nil || v == 0 {
			p.fail(s, "not a fwmark: use a number between 1 and 4294967295")
		}
		cfg.InboundTProxyMark = uint32(v)
	}
	if s := p.get(FlagTProxyRouteTable); s.set {
		v, err := strconv.ParseUint(strings.TrimSpace(s.value), 10, 32)
		switch {
		case err != nil || v == 0:
			p.fail(s, "not a routing table: use a number between 1 and 4294967295")
		case v >= 253 && v <= 255:
			p.fail(s, "table %d is the kernel's default, main or local table: use another number (Istio uses 133)", v)
		}
		cfg.InboundTProxyRouteTable = int(v)
	}

	p.parseEnvOnly(&cfg, log)

	cfg.DryRun = p.boolean(FlagDryRun)
	cfg.SkipRuleApply = p.boolean(FlagSkipRuleApply)
	cfg.RunValidation = p.boolean(FlagRunValidation)
	cfg.RedirectDNS = p.boolean(FlagRedirectDNS)
	cfg.DropInvalid = p.boolean(FlagDropInvalid)
	cfg.DualStack = p.boolean(FlagDualStack)
	cfg.CaptureAllDNS = p.boolean(FlagCaptureAllDNS)
	cfg.CNIMode = p.boolean(FlagCNIMode)
	cfg.Reconcile = p.boolean(FlagReconcile)
	cfg.CleanupOnly = p.boolean(FlagCleanupOnly)
	cfg.ForceApply = p.boolean(FlagForceApply)
	cfg.NativeNftables = p.boolean(FlagNativeNftables)
	cfg.NetworkNamespace = p.get(FlagNetworkNamespace).value
	if s := p.get(FlagProbeTimeout); s.set {
		d, err := time.ParseDuration(strings.TrimSpace(s.value))
		if err != nil || d <= 0 {
			p.fail(s, "not a positive duration such as 5s")
		}
		cfg.ProbeTimeout = d
	}
	if s := p.get(FlagForceIptablesBinary); s.set {
		switch v := strings.TrimSpace(s.value); v {
		case "", "legacy", "nft":
			cfg.ForceIptablesBinary = v
		default:
			p.fail(s, `unknown iptables backend: use "legacy" or "nft", or leave it empty to detect`)
		}
	}
	if len(p.errs) > 0 {
		return nil, fmt.Errorf("istio-iptables: bad configuration, nothing was changed: %w", errors.Join(p.errs...))
	}
	if cfg.NativeNftables {
		log.Warn("--native-nftables is not supported; using iptables (rules are equivalent)")
	}

	addrs := in.InterfaceAddrs
	if cfg.NetworkNamespace != "" && hostAddrs {
		// The pod's addresses decide on IPv6 rules: read them in the pod's
		// namespace, not in the one the command runs in.
		addrs = func() (out []net.Addr, err error) {
			err = inNetns(cfg.NetworkNamespace, func() error {
				out, err = in.InterfaceAddrs()
				return err
			})
			return out, err
		}
	}
	if err := deriveIPv6(&cfg, addrs, log); err != nil {
		return nil, err
	}
	if cfg.RedirectDNS && !cfg.CaptureAllDNS {
		servers, err := ReadNameservers(in.ResolvConf, log)
		if err != nil {
			return nil, fmt.Errorf("istio-iptables: --redirect-dns needs the pod's resolvers: %w", err)
		}
		for _, s := range servers {
			if s.Is4() {
				cfg.DNSServersV4 = append(cfg.DNSServersV4, s)
			} else {
				cfg.DNSServersV6 = append(cfg.DNSServersV6, s)
			}
		}
		if len(servers) == 0 {
			log.Warn("DNS capture is disabled: --redirect-dns is set but resolv.conf lists no nameserver and --capture-all-dns is not set",
				zap.String("resolv_conf", in.ResolvConf))
		}
	}
	return &cfg, nil
}

// parseOwners reads the proxy uids and gids; the default uid is ENVOY_USER's.
func (p *parser) parseOwners(cfg *Config) {
	if s := p.get(FlagProxyUID); s.set && strings.TrimSpace(s.value) != "" {
		cfg.ProxyUIDs = p.ids(s, "uid")
	} else {
		name := defaultEnvoyUser
		if e := p.env(EnvEnvoyUser); e.set {
			name = e.value
		}
		cfg.ProxyUIDs = []string{DefaultProxyUID}
		if uid, err := p.in.LookupUserUID(name); err == nil && uid != "" {
			cfg.ProxyUIDs = []string{uid}
		}
	}
	if s := p.get(FlagProxyGID); s.set && strings.TrimSpace(s.value) != "" {
		cfg.ProxyGIDs = p.ids(s, "gid")
	} else {
		cfg.ProxyGIDs = cfg.ProxyUIDs
	}
}

// parseEnvOnly reads the settings that have no flag.
func (p *parser) parseEnvOnly(cfg *Config, log *zap.Logger) {
	if s := p.env(EnvHostIPv4LoopbackCIDR); s.set {
		c, err := netip.ParsePrefix(strings.TrimSpace(s.value))
		switch {
		case err != nil:
			p.fail(s, "not a CIDR: use an IPv4 loopback CIDR such as 127.0.0.1/32")
		case !c.Addr().Is4() || !c.Addr().IsLoopback() || c.Bits() < 8:
			p.fail(s, "must be an IPv4 loopback CIDR (in 127.0.0.0/8) with a mask of 8 to 32")
		default:
			cfg.HostIPv4LoopbackCIDR = c
		}
	}
	include := p.env(EnvOwnerGroupsInclude)
	exclude := p.env(EnvOwnerGroupsExclude)
	if include.set && strings.TrimSpace(include.value) != "*" {
		cfg.OwnerGroupsInclude = p.groups(include)
		if len(cfg.OwnerGroupsInclude) > maxOwnerGroups {
			p.fail(include, "%d groups: at most %d can be listed, or use \"*\" with %s",
				len(cfg.OwnerGroupsInclude), maxOwnerGroups, EnvOwnerGroupsExclude)
		}
		if exclude.set {
			log.Warn("group exclusions apply only when all groups are captured; ignoring them",
				zap.String("env", EnvOwnerGroupsExclude), zap.String("include", include.value))
		}
		return
	}
	cfg.OwnerGroupsExclude = p.groups(exclude)
}

// deriveIPv6 sets EnableIPv6 and HostIP from the pod's addresses as Istio
// does: the first address that is neither loopback nor link-local decides;
// with --dual-stack, any IPv6 address enables IPv6. Unlike Istio, a pod with
// no such address gets IPv4 rules and a warning instead of a failure.
func deriveIPv6(cfg *Config, addrs func() ([]net.Addr, error), log *zap.Logger) error {
	list, err := addrs()
	if err != nil {
		return fmt.Errorf("istio-iptables: list the pod's addresses to decide on IPv6 rules: %w", err)
	}
	for _, a := range list {
		ipnet, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(ipnet.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() {
			continue
		}
		if !cfg.HostIP.IsValid() {
			cfg.HostIP = ip
		}
		if ip.Is6() {
			cfg.EnableIPv6 = true
		}
		if !cfg.DualStack || cfg.EnableIPv6 {
			return nil
		}
	}
	if !cfg.HostIP.IsValid() {
		log.Warn("the pod has no address other than loopback and link-local; building IPv4 rules only")
	}
	return nil
}
