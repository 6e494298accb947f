package iptables

import (
	"github.com/spf13/pflag"
)

// FlagSpec describes one istio-iptables setting: its flag, env vars and
// default. The command registers its flags from this table and ParseConfig
// reads values by it, so names, env vars and defaults live in one place.
type FlagSpec struct {
	// Name is the long flag name; "" for settings that are env-only.
	Name string
	// Shorthand is the one-letter flag, if any.
	Shorthand string
	// Env are the env vars read when the flag is not on the command line:
	// the flag's own first, then aliases, which win when both are set
	// (ISTIO_META_DNS_CAPTURE over REDIRECT_DNS), as Istio applies them.
	Env []string
	// Default is the value used when neither the flag nor an env var is set,
	// as text (what help and docs show).
	Default string
	// Bool flags take no value on the command line.
	Bool bool
	// Usage is the help text.
	Usage string
	// Outrigger is true for settings Istio does not have.
	Outrigger bool
}

// Long flag names, also the keys of Inputs.Flags.
const (
	FlagEnvoyPort               = "envoy-port"
	FlagInboundCapturePort      = "inbound-capture-port"
	FlagInboundTunnelPort       = "inbound-tunnel-port"
	FlagProxyUID                = "proxy-uid"
	FlagProxyGID                = "proxy-gid"
	FlagInterceptionMode        = "istio-inbound-interception-mode"
	FlagInboundPorts            = "istio-inbound-ports"
	FlagLocalExcludePorts       = "istio-local-exclude-ports"
	FlagExcludeInterfaces       = "istio-exclude-interfaces"
	FlagServiceCIDR             = "istio-service-cidr"
	FlagServiceExcludeCIDR      = "istio-service-exclude-cidr"
	FlagOutboundPorts           = "istio-outbound-ports"
	FlagLocalOutboundPortsExcl  = "istio-local-outbound-ports-exclude"
	FlagKubeVirtInterfaces      = "kube-virt-interfaces"
	FlagTProxyMark              = "istio-inbound-tproxy-mark"
	FlagTProxyRouteTable        = "istio-inbound-tproxy-route-table"
	FlagDryRun                  = "dry-run"
	FlagProbePort               = "iptables-probe-port"
	FlagProbeTimeout            = "probe-timeout"
	FlagSkipRuleApply           = "skip-rule-apply"
	FlagRunValidation           = "run-validation"
	FlagRedirectDNS             = "redirect-dns"
	FlagDropInvalid             = "drop-invalid"
	FlagDualStack               = "dual-stack"
	FlagCaptureAllDNS           = "capture-all-dns"
	FlagNetworkNamespace        = "network-namespace"
	FlagCNIMode                 = "cni-mode"
	FlagReconcile               = "reconcile"
	FlagCleanupOnly             = "cleanup-only"
	FlagForceApply              = "force-apply"
	FlagNativeNftables          = "native-nftables"
	FlagForceIptablesBinary     = "force-iptables-binary"
	EnvHostIPv4LoopbackCIDR     = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"
	EnvOwnerGroupsInclude       = "ISTIO_OUTBOUND_OWNER_GROUPS"
	EnvOwnerGroupsExclude       = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"
	EnvEnvoyUser                = "ENVOY_USER"
	EnvDryRunFilePath           = "DRY_RUN_FILE_PATH"
	defaultEnvoyUser            = "istio-proxy"
	defaultOwnerGroupsInclude   = "*"
	defaultHostIPv4LoopbackCIDR = "127.0.0.1/32"
)

// FlagSpecs returns every istio-iptables setting, flags first, then the
// env-only ones. The env var of a flag is its name in upper case with '-'
// as '_', as Istio binds them; --envoy-port has none.
func FlagSpecs() []FlagSpec {
	return []FlagSpec{
		{Name: FlagEnvoyPort, Shorthand: "p", Default: "15001",
			Usage: "port to which all outbound TCP traffic is redirected (the proxy's outbound listener)"},
		{Name: FlagInboundCapturePort, Shorthand: "z", Env: []string{"INBOUND_CAPTURE_PORT"}, Default: "15006",
			Usage: "port to which all inbound TCP traffic to the pod is redirected"},
		{Name: FlagInboundTunnelPort, Shorthand: "e", Env: []string{"INBOUND_TUNNEL_PORT"}, Default: "15008",
			Usage: "HBONE tunnel port, never captured"},
		{Name: FlagProxyUID, Shorthand: "u", Env: []string{"PROXY_UID"}, Default: "",
			Usage: "comma-separated uids whose outbound traffic is not captured (default: uid of $ENVOY_USER, else 1337)"},
		{Name: FlagProxyGID, Shorthand: "g", Env: []string{"PROXY_GID"}, Default: "",
			Usage: "comma-separated gids whose outbound traffic is not captured (default: same as --proxy-uid)"},
		{Name: FlagInterceptionMode, Shorthand: "m", Env: []string{"ISTIO_INBOUND_INTERCEPTION_MODE"}, Default: "REDIRECT",
			Usage: `inbound capture mode: "REDIRECT" or "TPROXY"`},
		{Name: FlagInboundPorts, Shorthand: "b", Env: []string{"ISTIO_INBOUND_PORTS"}, Default: "",
			Usage: `comma-separated inbound ports to capture, or "*" for all; empty captures no inbound traffic`},
		{Name: FlagLocalExcludePorts, Shorthand: "d", Env: []string{"ISTIO_LOCAL_EXCLUDE_PORTS"}, Default: "",
			Usage: `comma-separated inbound ports not captured (only with --istio-inbound-ports "*")`},
		{Name: FlagExcludeInterfaces, Shorthand: "c", Env: []string{"ISTIO_EXCLUDE_INTERFACES"}, Default: "",
			Usage: "comma-separated interfaces on which neither direction is captured"},
		{Name: FlagServiceCIDR, Shorthand: "i", Env: []string{"ISTIO_SERVICE_CIDR"}, Default: "",
			Usage: `comma-separated CIDRs whose outbound traffic is captured, or "*" for all; empty captures no outbound traffic`},
		{Name: FlagServiceExcludeCIDR, Shorthand: "x", Env: []string{"ISTIO_SERVICE_EXCLUDE_CIDR"}, Default: "",
			Usage: "comma-separated CIDRs whose outbound traffic is not captured"},
		{Name: FlagOutboundPorts, Shorthand: "q", Env: []string{"ISTIO_OUTBOUND_PORTS"}, Default: "",
			Usage: "comma-separated outbound TCP ports always captured"},
		{Name: FlagLocalOutboundPortsExcl, Shorthand: "o", Env: []string{"ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"}, Default: "",
			Usage: "comma-separated outbound TCP and UDP ports never captured"},
		{Name: FlagKubeVirtInterfaces, Shorthand: "k", Env: []string{"KUBE_VIRT_INTERFACES"}, Default: "",
			Usage: "comma-separated virtual interfaces whose inbound traffic is treated as outbound"},
		{Name: FlagTProxyMark, Shorthand: "t", Env: []string{"ISTIO_INBOUND_TPROXY_MARK"}, Default: "1337",
			Usage: "fwmark of TPROXY-captured packets"},
		{Name: FlagTProxyRouteTable, Shorthand: "r", Env: []string{"ISTIO_INBOUND_TPROXY_ROUTE_TABLE"}, Default: "133",
			Usage: "policy routing table for TPROXY-captured packets"},
		{Name: FlagDryRun, Shorthand: "n", Env: []string{"DRY_RUN"}, Default: "false", Bool: true,
			Usage: "print the iptables-restore input per IP family and change nothing"},
		{Name: FlagProbePort, Env: []string{"IPTABLES_PROBE_PORT"}, Default: "15002",
			Usage: "original destination port of the --run-validation probe"},
		{Name: FlagProbeTimeout, Env: []string{"PROBE_TIMEOUT"}, Default: "5s",
			Usage: "how long --run-validation waits for a redirected connection"},
		{Name: FlagSkipRuleApply, Env: []string{"SKIP_RULE_APPLY"}, Default: "false", Bool: true,
			Usage: "do not apply rules (with the CNI, which applied them)"},
		{Name: FlagRunValidation, Env: []string{"RUN_VALIDATION"}, Default: "false", Bool: true,
			Usage: "prove with a real connection that redirection works; failure exits 126"},
		{Name: FlagRedirectDNS, Env: []string{"REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"}, Default: "false", Bool: true,
			Usage: "capture DNS (port 53) to the agent's DNS proxy on 15053"},
		{Name: FlagDropInvalid, Env: []string{"DROP_INVALID", "INVALID_DROP"}, Default: "false", Bool: true,
			Usage: "drop packets conntrack marks INVALID instead of letting them reset connections"},
		{Name: FlagDualStack, Env: []string{"DUAL_STACK", "ISTIO_DUAL_STACK"}, Default: "false", Bool: true,
			Usage: "build IPv6 rules when the pod has any IPv6 address, not only when its first address is IPv6"},
		{Name: FlagCaptureAllDNS, Env: []string{"CAPTURE_ALL_DNS"}, Default: "false", Bool: true,
			Usage: "with --redirect-dns, capture DNS to any server, not only the resolv.conf ones"},
		{Name: FlagNetworkNamespace, Env: []string{"NETWORK_NAMESPACE"}, Default: "",
			Usage: "path of the network namespace to configure (default: the current one)"},
		{Name: FlagCNIMode, Env: []string{"CNI_MODE"}, Default: "false", Bool: true,
			Usage: "run as the CNI plugin does (pod-scoped xtables lock)"},
		{Name: FlagReconcile, Env: []string{"RECONCILE"}, Default: "false", Bool: true,
			Usage: "replace existing rules that differ from the wanted ones"},
		{Name: FlagCleanupOnly, Env: []string{"CLEANUP_ONLY"}, Default: "false", Bool: true,
			Usage: "only remove the chains, rules and routes istio-iptables owns"},
		{Name: FlagForceApply, Env: []string{"FORCE_APPLY"}, Default: "false", Bool: true,
			Usage: "apply even when the rules already look applied"},
		{Name: FlagNativeNftables, Env: []string{"NATIVE_NFTABLES"}, Default: "false", Bool: true,
			Usage: "accepted for compatibility; not supported, iptables is used (with a warning)"},
		{Name: FlagForceIptablesBinary, Env: []string{"FORCE_IPTABLES_BINARY"}, Default: "",
			Usage: `use this iptables backend: "legacy" or "nft" (default: detect)`},
		{Env: []string{EnvHostIPv4LoopbackCIDR}, Default: defaultHostIPv4LoopbackCIDR,
			Usage: "IPv4 loopback range never captured; an IPv4 loopback CIDR with a mask of 8 to 32"},
		{Env: []string{EnvOwnerGroupsInclude}, Default: defaultOwnerGroupsInclude,
			Usage: `comma-separated groups (gids or names, at most 64) whose outbound traffic is captured, or "*"`},
		{Env: []string{EnvOwnerGroupsExclude}, Default: "",
			Usage: `comma-separated groups whose outbound traffic is not captured (only with ISTIO_OUTBOUND_OWNER_GROUPS="*")`},
		{Env: []string{EnvEnvoyUser}, Default: defaultEnvoyUser,
			Usage: "user whose uid is the default --proxy-uid"},
		{Env: []string{EnvDryRunFilePath}, Default: "",
			Usage: "with --dry-run, also write the output to this file"},
	}
}

// RegisterFlags defines every istio-iptables flag on fs. Values are read
// back with ChangedFlags and parsed by ParseConfig, so fs keeps them as raw
// text (bool flags excepted) and our errors, not pflag's, name bad values.
func RegisterFlags(fs *pflag.FlagSet) {
	for _, s := range FlagSpecs() {
		if s.Name == "" {
			continue
		}
		usage := s.Usage
		if len(s.Env) > 0 {
			usage += " (env " + s.Env[0]
			for _, e := range s.Env[1:] {
				usage += " or " + e
			}
			usage += ")"
		}
		if s.Bool {
			fs.BoolP(s.Name, s.Shorthand, false, usage)
			continue
		}
		fs.StringP(s.Name, s.Shorthand, s.Default, usage)
	}
}

// ChangedFlags returns the istio-iptables flags set on the command line, by
// long name, with their raw values: the Inputs.Flags of ParseConfig. Other
// flags of fs (such as the log flags) are left out.
func ChangedFlags(fs *pflag.FlagSet) map[string]string {
	known := map[string]bool{}
	for _, s := range FlagSpecs() {
		known[s.Name] = s.Name != ""
	}
	set := map[string]string{}
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed && known[f.Name] {
			set[f.Name] = f.Value.String()
		}
	})
	return set
}
