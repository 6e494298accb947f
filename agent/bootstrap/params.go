// Package bootstrap produces the Envoy bootstrap the agent starts Envoy with
// (<configPath>/envoy-rev.json): the built-in one, generated from typed
// Envoy protos, or a user's Go template, plus Istio's
// ISTIO_BOOTSTRAP_OVERRIDE overlay. Whatever the source, Validate checks it
// strictly with Envoy's own protos before Envoy starts, so a bad bootstrap is
// one clear error naming the field, not an Envoy crash loop.
package bootstrap

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/outrigger-mesh/outrigger/agent/config"
)

// Options are the bootstrap settings that come from the environment and
// flags rather than from the ProxyConfig. DefaultOptions has Istio's defaults.
type Options struct {
	// Delta selects ads_config.api_type DELTA_GRPC; false selects GRPC (SotW).
	// Env ISTIO_DELTA_XDS, default true. Waypoints always use delta.
	Delta bool
	// DualStack is ISTIO_DUAL_STACK: listen on both families when the node
	// has both. Default false.
	DualStack bool
	// EnvoyStatusPort is ENVOY_STATUS_PORT (default 15021). The agent serves
	// this port itself; templates get it as .envoy_status_port.
	EnvoyStatusPort uint16
	// EnvoyPrometheusPort is ENVOY_PROMETHEUS_PORT (default 15090): the
	// static Prometheus listener.
	EnvoyPrometheusPort uint16
	// SDSSocketPath is the sds-grpc cluster's pipe:
	// ./var/run/secrets/workload-spiffe-uds/<WORKLOAD_IDENTITY_SOCKET_FILE>.
	SDSSocketPath string
	// ExitOnZeroActiveConnections is EXIT_ON_ZERO_ACTIVE_CONNECTIONS: keeps
	// the downstream_cx_active stats the drain loop polls.
	ExitOnZeroActiveConnections bool
	// MetadataDiscovery is PEER_METADATA_DISCOVERY (honoured with Delta only).
	MetadataDiscovery bool
	// StripFragment is HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED
	// (default true); false adds the runtime flag that keeps fragments.
	StripFragment bool
	// TemplateEnv is ISTIO_BOOTSTRAP: a template path that wins over
	// proxyBootstrapTemplatePath.
	TemplateEnv string
	// OverrideFile is ISTIO_BOOTSTRAP_OVERRIDE: a YAML/JSON bootstrap merged
	// by Envoy over the main one (--config-yaml).
	OverrideFile string
	// HostIP is HOST_IP, substituted for $(HOST_IP) in the override file.
	HostIP string
	// LogAsJSON is --log_as_json: Envoy's application log becomes JSON.
	LogAsJSON bool
	// OutlierLogPath is --outlierLogPath.
	OutlierLogPath string
}

// DefaultOptions returns Istio's defaults.
func DefaultOptions() Options {
	return Options{
		Delta:               true,
		EnvoyStatusPort:     15021,
		EnvoyPrometheusPort: 15090,
		SDSSocketPath:       config.DefaultSDSSocketPath,
		StripFragment:       true,
	}
}

// OptionsFromEnv reads Options from the agent's environment; errors name the
// variable.
func OptionsFromEnv(env config.Env) (Options, error) {
	o := DefaultOptions()
	var err error
	boolVar := func(dst *bool, key string) {
		if err == nil {
			*dst, err = env.Bool(key, *dst)
		}
	}
	portVar := func(dst *uint16, key string) {
		if v := strings.TrimSpace(env.Get(key)); v != "" && err == nil {
			n, perr := strconv.ParseUint(v, 10, 16)
			if perr != nil || n == 0 {
				err = fmt.Errorf("env %s: %q is not a port (use 1-65535)", key, v)
				return
			}
			*dst = uint16(n)
		}
	}
	boolVar(&o.Delta, "ISTIO_DELTA_XDS")
	boolVar(&o.DualStack, "ISTIO_DUAL_STACK")
	boolVar(&o.ExitOnZeroActiveConnections, "EXIT_ON_ZERO_ACTIVE_CONNECTIONS")
	boolVar(&o.MetadataDiscovery, "PEER_METADATA_DISCOVERY")
	boolVar(&o.StripFragment, "HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED")
	portVar(&o.EnvoyStatusPort, "ENVOY_STATUS_PORT")
	portVar(&o.EnvoyPrometheusPort, "ENVOY_PROMETHEUS_PORT")
	if err != nil {
		return o, err
	}
	if f := env.Get("WORKLOAD_IDENTITY_SOCKET_FILE"); f != "" {
		if strings.ContainsRune(f, '/') {
			return o, fmt.Errorf("env WORKLOAD_IDENTITY_SOCKET_FILE: %q must be a file name, not a path", f)
		}
		o.SDSSocketPath = strings.TrimSuffix(config.DefaultSDSSocketPath, "socket") + f
	}
	o.TemplateEnv = env.Get("ISTIO_BOOTSTRAP")
	o.OverrideFile = env.Get("ISTIO_BOOTSTRAP_OVERRIDE")
	o.HostIP = env.Get("HOST_IP")
	return o, nil
}

// Params is everything Generate needs.
type Params struct {
	Options
	// Node is the identity from config.NewNode.
	Node *config.Node
	// Proxy is the effective ProxyConfig from config.Load.
	Proxy *config.ProxyConfig
	// Root resolves relative paths the agent reads and writes (templates,
	// override, the output file); "" = working directory, as in Istio.
	Root string
}

// Loopback is the bootstrap's {{localhost}} for these node IPs and
// ISTIO_DUAL_STACK: where Envoy's admin API listens and how the static
// clusters reach the agent. The agent must talk to Envoy's admin (drain,
// readiness, stats) at this same address.
func Loopback(ips []netip.Addr, dualStack bool) netip.Addr {
	return netip.MustParseAddr(familyOf(ips, dualStack).localhost)
}

// ipFamily decides the loopback, wildcard and DNS lookup family from the
// node IPs, as Istio does.
type ipFamily struct {
	localhost, wildcard, additionalWildcard, dnsLookupFamily string
	dualStack                                                bool
}

func familyOf(ips []netip.Addr, dualStack bool) ipFamily {
	v4, v6 := 0, 0
	for _, a := range ips {
		if a.Is4() {
			v4++
		} else {
			v6++
		}
	}
	v4only := ipFamily{localhost: "127.0.0.1", wildcard: "0.0.0.0", dnsLookupFamily: "V4_ONLY"}
	switch {
	case v6 == 0:
		return v4only
	case v4 == 0:
		return ipFamily{localhost: "::1", wildcard: "::", dnsLookupFamily: "V6_ONLY"}
	case !dualStack:
		return v4only
	case ips[0].Is6():
		return ipFamily{localhost: "::1", wildcard: "::", additionalWildcard: "0.0.0.0", dnsLookupFamily: "ALL", dualStack: true}
	}
	return ipFamily{localhost: "127.0.0.1", wildcard: "0.0.0.0", additionalWildcard: "::", dnsLookupFamily: "ALL", dualStack: true}
}
