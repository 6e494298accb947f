package config

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"go.uber.org/zap"
)

// Interface is one host network interface, as node IP discovery sees it.
type Interface struct {
	Name         string
	Up, Loopback bool
	Addrs        []netip.Addr
}

// HostInterfaces lists the host's interfaces and their addresses.
func HostInterfaces() ([]Interface, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list network interfaces: %w", err)
	}
	out := make([]Interface, 0, len(ifs))
	for _, ifc := range ifs {
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		i := Interface{Name: ifc.Name, Up: ifc.Flags&net.FlagUp != 0, Loopback: ifc.Flags&net.FlagLoopback != 0}
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil {
				i.Addrs = append(i.Addrs, p.Addr().Unmap())
			}
		}
		out = append(out, i)
	}
	return out, nil
}

// NodeOptions are the inputs of the node identity and metadata besides
// the ProxyConfig.
type NodeOptions struct {
	// Type is the proxy type (first field of the node ID).
	Type ProxyType
	// Domain is --domain; "" becomes <POD_NAMESPACE>.svc.cluster.local.
	Domain string
	// Env is the process environment (POD_NAME, POD_NAMESPACE, INSTANCE_IP,
	// SERVICE_ACCOUNT, ISTIO_META_*, ISTIO_METAJSON_*).
	Env Env
	// Pod is the downward API info (labels, annotations).
	Pod PodInfo
	// Interfaces lists host interfaces; nil means HostInterfaces.
	Interfaces func() ([]Interface, error)
	// IstioVersion is the ISTIO_VERSION metadata unless ISTIO_META_ISTIO_VERSION
	// sets it; "" leaves it out (istiod then assumes the newest proxy).
	IstioVersion string
	// StsPort is --stsPort (STS_PORT metadata when > 0).
	StsPort uint16
	// OutlierLogPath is --outlierLogPath.
	OutlierLogPath string
	// PilotSAN overrides PILOT_SAN; nil derives it from discoveryAddress.
	PilotSAN []string
	// EnvoyStatusPort is ENVOY_STATUS_PORT (15021); 0 leaves it out.
	EnvoyStatusPort uint16
	// EnvoyPrometheusPort is ENVOY_PROMETHEUS_PORT (15090); 0 leaves it out.
	EnvoyPrometheusPort uint16
	// ExitOnZeroActiveConnections is EXIT_ON_ZERO_ACTIVE_CONNECTIONS.
	ExitOnZeroActiveConnections bool
	// MetadataDiscovery is METADATA_DISCOVERY (PEER_METADATA_DISCOVERY).
	MetadataDiscovery bool
	// CredentialSocketExists adds CREDENTIAL_SOCKET_EXISTS=true.
	CredentialSocketExists bool
}

// Locality is the node's region/zone/sub-zone.
type Locality struct {
	Region, Zone, SubZone string
}

// Node is the identity Envoy presents to the control plane.
type Node struct {
	// ID is <type>~<ip0>~<pod>.<namespace>~<domain>.
	ID        string
	Type      ProxyType
	IPs       []netip.Addr
	PodName   string
	Namespace string
	Domain    string
	// Cluster is node.cluster (from serviceCluster/tracingServiceName).
	Cluster  string
	Locality Locality
	// Metadata is node.metadata as a JSON object.
	Metadata map[string]any
}

// Well-known labels.
const (
	LocalityLabel       = "topology.istio.io/locality"
	LegacyLocalityLabel = "istio-locality"
	podTemplateHash     = "pod-template-hash"
)

// EffectiveEnv is env with the ProxyConfig's proxyMetadata applied over it:
// Istio exports every proxyMetadata entry into the agent's environment, so
// proxyMetadata wins over the container env, for the agent and for Envoy.
func EffectiveEnv(env Env, p *ProxyConfig) Env {
	out := make(Env, len(env)+len(p.ProxyMetadata))
	for k, v := range env {
		out[k] = v
	}
	for k, v := range p.ProxyMetadata {
		out[k] = v
	}
	return out
}

// PilotSAN is the control plane's expected TLS name: the host of
// discoveryAddress, or istiod.istio-system.svc for localhost.
func PilotSAN(discoveryAddress string) string {
	host, _, _ := strings.Cut(discoveryAddress, ":")
	if host == "localhost" {
		return "istiod.istio-system.svc"
	}
	return host
}

// NewNode builds the node identity and metadata as Istio's agent does
// (ServiceNode, GetNodeMetaData): the control plane keys its config on them.
func NewNode(opts NodeOptions, p *ProxyConfig, log *zap.Logger) (*Node, error) {
	if log == nil {
		log = zap.NewNop()
	}
	env := EffectiveEnv(opts.Env, p)
	ips, err := nodeIPs(opts, env)
	if err != nil {
		return nil, err
	}
	n := &Node{
		Type:      opts.Type,
		IPs:       ips,
		PodName:   env.Get("POD_NAME"),
		Namespace: env.Get("POD_NAMESPACE"),
		Domain:    opts.Domain,
	}
	if n.Type == "" {
		n.Type = Sidecar
	}
	if n.Domain == "" {
		n.Domain = n.Namespace + ".svc.cluster.local"
	}
	ip0 := ""
	if len(ips) > 0 {
		ip0 = ips[0].String()
	}
	n.ID = strings.Join([]string{string(n.Type), ip0, n.PodName + "." + n.Namespace, n.Domain}, "~")

	if n.Metadata, err = nodeMetadata(opts, p, env, ips, log); err != nil {
		return nil, err
	}
	labels, _ := n.Metadata["LABELS"].(map[string]string)
	n.Locality = localityFromLabels(labels)
	if labels[LocalityLabel] != "" {
		// Istio stores the label with "/" separators, as istiod reads it.
		labels[LocalityLabel] = strings.ReplaceAll(labels[LocalityLabel], ".", "/")
	}
	workload, _ := n.Metadata["WORKLOAD_NAME"].(string)
	n.Cluster = serviceCluster(p, labels, workload, n.Namespace)
	return n, nil
}

// nodeIPs is INSTANCE_IP, then the host's private IPs (or 127.0.0.1 and ::1
// when there are none), minus the addresses of the interfaces named in the
// traffic.sidecar.istio.io/excludeInterfaces annotation, without duplicates.
func nodeIPs(opts NodeOptions, env Env) ([]netip.Addr, error) {
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	if a, err := netip.ParseAddr(strings.TrimSpace(env.Get("INSTANCE_IP"))); err == nil {
		a = a.Unmap()
		out = append(out, a)
		seen[a] = true
	}
	list := opts.Interfaces
	if list == nil {
		list = HostInterfaces
	}
	ifs, err := list()
	if err != nil {
		return nil, err
	}
	excluded := map[string]bool{}
	for _, name := range strings.Split(opts.Pod.Annotations[ExcludeIfaceAnnotation], ",") {
		if name = strings.TrimSpace(name); name != "" {
			excluded[name] = true
		}
	}
	excludedAddrs := map[netip.Addr]bool{}
	var private []netip.Addr
	for _, ifc := range ifs {
		if excluded[ifc.Name] {
			for _, a := range ifc.Addrs {
				excludedAddrs[a] = true
			}
			continue
		}
		if !ifc.Up || ifc.Loopback {
			continue
		}
		for _, a := range ifc.Addrs {
			if a.IsLoopback() || a.IsUnspecified() || a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() {
				continue
			}
			private = append(private, a)
		}
	}
	if len(private) == 0 {
		private = []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")}
	}
	for _, a := range private {
		if seen[a] || excludedAddrs[a] {
			continue
		}
		seen[a] = true
		out = append(out, a)
	}
	return out, nil
}

// stringBoolKeys are metadata keys Istio types as "true"/"false" strings; a
// value that is not a boolean makes Istio's agent fail, and ours too.
var stringBoolKeys = []string{
	"DNS_CAPTURE", "DNS_AUTO_ALLOCATE", "ENABLE_HBONE", "DISABLE_HBONE_SEND",
	"EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "INBOUND_LISTENER_EXACT_BALANCE",
	"OUTBOUND_LISTENER_EXACT_BALANCE", "METADATA_DISCOVERY", "ENVOY_SKIP_DEPRECATED_LOGS",
}

// mapKeys are metadata keys Istio types as string maps.
var mapKeys = []string{"LABELS", "STATIC_LABELS", "ANNOTATIONS", "PLATFORM_METADATA"}

const (
	metaPrefix     = "ISTIO_META_"
	metaJSONPrefix = "ISTIO_METAJSON_"
)

func nodeMetadata(opts NodeOptions, p *ProxyConfig, env Env, ips []netip.Addr, log *zap.Logger) (map[string]any, error) {
	meta := map[string]any{}
	// proxyMetadata first; env (which already includes proxyMetadata, see
	// EffectiveEnv) overrides it. Sorted for a stable result.
	for _, k := range sortedKeys(p.ProxyMetadata) {
		if strings.HasPrefix(k, metaPrefix) {
			meta[strings.TrimPrefix(k, metaPrefix)] = p.ProxyMetadata[k]
		}
	}
	envKeys := sortedKeys(env)
	for _, k := range envKeys {
		if strings.HasPrefix(k, metaPrefix) {
			meta[strings.TrimPrefix(k, metaPrefix)] = env[k]
		}
	}
	var staticLabels map[string]string
	for _, k := range envKeys {
		if !strings.HasPrefix(k, metaJSONPrefix) {
			continue
		}
		// Istio merges each ISTIO_METAJSON_* object into the top level.
		var obj map[string]any
		if err := json.Unmarshal([]byte(env[k]), &obj); err != nil {
			log.Warn("ignoring env var: not a JSON object", zap.String("env", k), zap.Error(err))
			continue
		}
		for ok, ov := range obj {
			meta[ok] = ov
		}
		if k == metaJSONPrefix+"LABELS" {
			var m map[string]string
			if err := json.Unmarshal([]byte(env[k]), &m); err != nil {
				return nil, fmt.Errorf("env %s: want a JSON object of strings: %w", k, err)
			}
			if len(m) > 0 {
				staticLabels = m
			}
		}
	}

	// Typed keys: check and normalise what Istio's typed metadata would.
	for _, k := range stringBoolKeys {
		v, ok := meta[k]
		if !ok {
			continue
		}
		s, isStr := v.(string)
		b, err := strconv.ParseBool(s)
		if !isStr || err != nil {
			return nil, fmt.Errorf("node metadata %s (env %s%s): %v is not a boolean (use \"true\" or \"false\")", k, metaPrefix, k, v)
		}
		if b {
			meta[k] = "true"
		}
	}
	for _, k := range mapKeys {
		if v, ok := meta[k]; ok {
			m, err := toStringMap(v)
			if err != nil {
				return nil, fmt.Errorf("node metadata %s: %w", k, err)
			}
			meta[k] = m
		}
	}
	if v, ok := meta["POD_PORTS"].(string); ok {
		var ports []map[string]any
		if err := json.Unmarshal([]byte(v), &ports); err != nil {
			return nil, fmt.Errorf("node metadata POD_PORTS (env %sPOD_PORTS): not a JSON list of ports: %w", metaPrefix, err)
		}
	}

	if len(ips) > 0 {
		s := make([]string, len(ips))
		for i, a := range ips {
			s[i] = a.String()
		}
		meta["INSTANCE_IPS"] = strings.Join(s, ",")
	}
	if opts.StsPort != 0 {
		meta["STS_PORT"] = strconv.Itoa(int(opts.StsPort))
	}
	if opts.EnvoyStatusPort != 0 {
		meta["ENVOY_STATUS_PORT"] = int(opts.EnvoyStatusPort)
	}
	if opts.EnvoyPrometheusPort != 0 {
		meta["ENVOY_PROMETHEUS_PORT"] = int(opts.EnvoyPrometheusPort)
	}
	if opts.ExitOnZeroActiveConnections {
		meta["EXIT_ON_ZERO_ACTIVE_CONNECTIONS"] = "true"
	}
	if opts.MetadataDiscovery {
		meta["METADATA_DISCOVERY"] = "true"
	}
	pcJSON, err := p.MarshalJSON()
	if err != nil {
		return nil, fmt.Errorf("encode PROXY_CONFIG metadata: %w", err)
	}
	meta["PROXY_CONFIG"] = json.RawMessage(pcJSON)
	if v, _ := meta["ISTIO_VERSION"].(string); v == "" && opts.IstioVersion != "" {
		meta["ISTIO_VERSION"] = opts.IstioVersion
	}
	for key, env := range map[string]string{"NAME": "POD_NAME", "NAMESPACE": "POD_NAMESPACE", "SERVICE_ACCOUNT": "SERVICE_ACCOUNT"} {
		if v := opts.Env.Get(env); v != "" {
			meta[key] = v
		}
	}
	if staticLabels != nil {
		meta["STATIC_LABELS"] = staticLabels
		meta["LABELS"] = staticLabels
	}
	if opts.Pod.Labels != nil {
		labels := map[string]string{}
		for k, v := range staticLabels {
			labels[k] = v
		}
		for k, v := range opts.Pod.Labels {
			if k != podTemplateHash {
				labels[k] = v
			}
		}
		meta["LABELS"] = labels
	}
	if opts.Pod.Annotations != nil {
		annos, _ := meta["ANNOTATIONS"].(map[string]string)
		if annos == nil {
			annos = map[string]string{}
		}
		for k, v := range opts.Pod.Annotations {
			annos[k] = v
		}
		meta["ANNOTATIONS"] = annos
	}
	san := opts.PilotSAN
	if san == nil {
		san = []string{PilotSAN(p.DiscoveryAddress)}
	}
	if len(san) > 0 {
		meta["PILOT_SAN"] = san
	}
	if opts.OutlierLogPath != "" {
		meta["OUTLIER_LOG_PATH"] = opts.OutlierLogPath
	}
	if opts.CredentialSocketExists {
		meta["CREDENTIAL_SOCKET_EXISTS"] = "true"
	}
	return meta, nil
}

func toStringMap(v any) (map[string]string, error) {
	switch m := v.(type) {
	case map[string]string:
		return m, nil
	case map[string]any:
		out := make(map[string]string, len(m))
		for k, e := range m {
			s, ok := e.(string)
			if !ok {
				return nil, fmt.Errorf("key %q: %v is not a string", k, e)
			}
			out[k] = s
		}
		return out, nil
	}
	return nil, fmt.Errorf("%v is not a map of strings", v)
}

// localityFromLabels reads topology.istio.io/locality (or the legacy
// istio-locality), where "." separates region, zone and sub-zone.
func localityFromLabels(labels map[string]string) Locality {
	s := labels[LocalityLabel]
	if s == "" {
		s = labels[LegacyLocalityLabel]
	}
	if s == "" {
		return Locality{}
	}
	parts := strings.SplitN(strings.ReplaceAll(s, ".", "/"), "/", 3)
	var l Locality
	l.Region = parts[0]
	if len(parts) > 1 {
		l.Zone = parts[1]
	}
	if len(parts) > 2 {
		l.SubZone = parts[2]
	}
	return l
}

// serviceCluster is node.cluster as Istio derives it.
func serviceCluster(p *ProxyConfig, labels map[string]string, workload, ns string) string {
	orDefault := func(name string) string {
		if name != "" && name != DefaultServiceCluster {
			return name
		}
		if app, ok := labels["app"]; ok {
			return app + "." + ns
		}
		if workload != "" {
			return workload + "." + ns
		}
		if ns != "" {
			return DefaultServiceCluster + "." + ns
		}
		return DefaultServiceCluster
	}
	if p.TracingServiceName == "" {
		return orDefault(p.ServiceCluster)
	}
	if workload == "" {
		workload = DefaultServiceCluster
	}
	switch p.TracingServiceName {
	case TracingCanonicalNameOnly:
		return orDefault(canonicalService(labels, workload))
	case TracingCanonicalNameAndNamespace:
		cs := canonicalService(labels, workload)
		if ns != "" {
			return cs + "." + ns
		}
		return orDefault(cs)
	}
	return orDefault(DefaultServiceCluster)
}

func canonicalService(labels map[string]string, workload string) string {
	for _, k := range []string{"service.istio.io/canonical-name", "app.kubernetes.io/name", "app"} {
		if v := labels[k]; v != "" {
			return v
		}
	}
	return workload
}

func sortedKeys[M ~map[string]V, V any](m M) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// MetadataJSON is node.metadata as a JSON object with sorted keys.
func (n *Node) MetadataJSON() ([]byte, error) {
	return json.Marshal(n.Metadata)
}
