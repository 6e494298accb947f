package iptables

import (
	"net/netip"
	"time"
)

// InterceptMode is how inbound traffic is captured.
type InterceptMode string

const (
	// ModeRedirect uses nat REDIRECT (the default).
	ModeRedirect InterceptMode = "REDIRECT"
	// ModeTPROXY uses mangle TPROXY, keeping the client's source address.
	ModeTPROXY InterceptMode = "TPROXY"
)

// Config is the typed form of the istio-iptables flags and environment. Every
// field is parsed and validated at the edge (cmd/outrigger); nothing below
// re-parses strings. Defaults are those of Istio's istio-iptables.
type Config struct {
	// ProxyPort is -p/--envoy-port (no env): outbound REDIRECT target. Default 15001.
	ProxyPort uint16
	// InboundCapturePort is -z/--inbound-capture-port, INBOUND_CAPTURE_PORT. Default 15006.
	InboundCapturePort uint16
	// InboundTunnelPort is -e/--inbound-tunnel-port, INBOUND_TUNNEL_PORT. Default 15008.
	InboundTunnelPort uint16
	// ProxyUIDs is -u/--proxy-uid, PROXY_UID. Default: uid of ENVOY_USER, else 1337.
	ProxyUIDs []string
	// ProxyGIDs is -g/--proxy-gid, PROXY_GID. Default: same as ProxyUIDs.
	ProxyGIDs []string
	// Mode is -m/--istio-inbound-interception-mode. Default REDIRECT.
	Mode InterceptMode
	// InboundPortsAll is true for -b '*'.
	InboundPortsAll bool
	// InboundPorts is -b as a list (when not '*'); empty and not All means no inbound capture.
	InboundPorts []uint16
	// InboundPortsExclude is -d/--istio-local-exclude-ports (only used with -b '*').
	InboundPortsExclude []uint16
	// ExcludeInterfaces is -c/--istio-exclude-interfaces.
	ExcludeInterfaces []string
	// OutboundIPRangesAll is true for -i '*'.
	OutboundIPRangesAll bool
	// OutboundIPRangesInclude is -i as CIDRs (when not '*'); empty and not All means no outbound capture.
	OutboundIPRangesInclude []netip.Prefix
	// OutboundIPRangesExclude is -x/--istio-service-exclude-cidr.
	OutboundIPRangesExclude []netip.Prefix
	// OutboundPortsInclude is -q/--istio-outbound-ports.
	OutboundPortsInclude []uint16
	// OutboundPortsExclude is -o/--istio-local-outbound-ports-exclude.
	OutboundPortsExclude []uint16
	// KubeVirtInterfaces is -k/--kube-virt-interfaces.
	KubeVirtInterfaces []string
	// InboundTProxyMark is -t/--istio-inbound-tproxy-mark. Default 1337.
	InboundTProxyMark uint32
	// InboundTProxyRouteTable is -r/--istio-inbound-tproxy-route-table. Default 133.
	InboundTProxyRouteTable int
	// HostIPv4LoopbackCIDR is ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR. Default 127.0.0.1/32.
	HostIPv4LoopbackCIDR netip.Prefix
	// OwnerGroupsInclude is ISTIO_OUTBOUND_OWNER_GROUPS; nil means '*' (all groups).
	OwnerGroupsInclude []string
	// OwnerGroupsExclude is ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE.
	OwnerGroupsExclude []string

	// RedirectDNS is --redirect-dns, REDIRECT_DNS or ISTIO_META_DNS_CAPTURE.
	RedirectDNS bool
	// CaptureAllDNS is --capture-all-dns, CAPTURE_ALL_DNS.
	CaptureAllDNS bool
	// DNSServersV4 and DNSServersV6 are the pod's resolvers from /etc/resolv.conf
	// (read only when RedirectDNS and not CaptureAllDNS).
	DNSServersV4, DNSServersV6 []netip.Addr
	// DropInvalid is --drop-invalid, DROP_INVALID or INVALID_DROP.
	DropInvalid bool
	// DualStack is --dual-stack, DUAL_STACK or ISTIO_DUAL_STACK.
	DualStack bool
	// EnableIPv6 is derived: the pod has an IPv6 address (see Istio's rules
	// with and without --dual-stack). IPv6 rules are built only when true.
	EnableIPv6 bool
	// HostIP is derived with EnableIPv6: the first non-loopback, non-link-local
	// address of the pod (invalid when there is none). --run-validation
	// listens on [::1] instead of 127.0.0.1 when it is IPv6, as Istio does.
	HostIP netip.Addr

	// DryRun is -n/--dry-run, DRY_RUN: print the restore input, change nothing.
	DryRun bool
	// DryRunFilePath is DRY_RUN_FILE_PATH: with DryRun, also write the
	// output there. Default "".
	DryRunFilePath string
	// SkipRuleApply is --skip-rule-apply, SKIP_RULE_APPLY.
	SkipRuleApply bool
	// RunValidation is --run-validation, RUN_VALIDATION (failure exits 126).
	RunValidation bool
	// ProbePort is --iptables-probe-port, IPTABLES_PROBE_PORT. Default 15002.
	ProbePort uint16
	// ProbeTimeout is --probe-timeout, PROBE_TIMEOUT. Default 5s.
	ProbeTimeout time.Duration
	// Reconcile is --reconcile, RECONCILE.
	Reconcile bool
	// CleanupOnly is --cleanup-only, CLEANUP_ONLY.
	CleanupOnly bool
	// ForceApply is --force-apply, FORCE_APPLY.
	ForceApply bool
	// ForceIptablesBinary is --force-iptables-binary, FORCE_IPTABLES_BINARY: "", "legacy" or "nft".
	ForceIptablesBinary string
	// NetworkNamespace is --network-namespace, NETWORK_NAMESPACE: a netns path
	// to run in ("" = the current namespace).
	NetworkNamespace string
	// CNIMode is --cni-mode, CNI_MODE.
	CNIMode bool
	// NativeNftables is --native-nftables, NATIVE_NFTABLES: accepted so
	// Istio's templates work, but not supported: iptables is used, with a
	// warning.
	NativeNftables bool
}

// DefaultConfig returns Istio's istio-iptables defaults: the values used for
// every flag and env var that is not set. ParseConfig starts from it.
func DefaultConfig() Config {
	return Config{
		ProxyPort:               15001,
		InboundCapturePort:      15006,
		InboundTunnelPort:       15008,
		ProxyUIDs:               []string{DefaultProxyUID},
		ProxyGIDs:               []string{DefaultProxyUID},
		Mode:                    ModeRedirect,
		InboundTProxyMark:       1337,
		InboundTProxyRouteTable: 133,
		HostIPv4LoopbackCIDR:    netip.MustParsePrefix("127.0.0.1/32"),
		ProbePort:               15002,
		ProbeTimeout:            5 * time.Second,
	}
}

// DefaultProxyUID is the proxy's uid (and gid) when ENVOY_USER cannot be
// looked up, as Istio's istio-proxy image defines it.
const DefaultProxyUID = "1337"

// Plan is what Build produces from a Config: the rules per family and the
// policy routes TPROXY needs. A nil V6 means no IPv6 rules.
type Plan struct {
	V4, V6 *Ruleset
	// Routes are the TPROXY policy routes ("ip rule fwmark M lookup T" and
	// "ip route add local default dev lo table T") per family; empty in
	// REDIRECT mode.
	Routes []PolicyRoute
	// LoopbackAddrs are the addresses to add to lo before the rules apply:
	// ::6/128 when IPv6 is enabled (the inbound passthrough source, which IPv6
	// cannot bind on lo otherwise; Istio's ConfigureRoutes). "File exists" is
	// not an error.
	LoopbackAddrs []netip.Prefix
}

// PolicyRoute is one fwmark rule plus its local default route.
type PolicyRoute struct {
	Family Family
	Mark   uint32
	Table  int
}

// Rulesets returns the non-nil rulesets, v4 first.
func (p *Plan) Rulesets() []*Ruleset {
	var out []*Ruleset
	for _, rs := range []*Ruleset{p.V4, p.V6} {
		if rs != nil {
			out = append(out, rs)
		}
	}
	return out
}

// dnsCaptureEnabled reports whether DNS rules are built: --redirect-dns with
// either --capture-all-dns or at least one resolver to capture. Istio turns
// --redirect-dns without servers into no DNS capture (with a warning, logged
// by ParseConfig).
func (c *Config) dnsCaptureEnabled() bool {
	return c.RedirectDNS && (c.CaptureAllDNS || len(c.DNSServersV4)+len(c.DNSServersV6) > 0)
}
