// Package config builds the proxy-mode configuration of the agent: Istio's
// ProxyConfig merged from its four sources (defaults, mesh config file,
// PROXY_CONFIG, pod annotation), and the node identity and metadata Envoy
// presents to the control plane. Everything here is parsed and validated once
// at start; the rest of the agent only reads typed values.
package config

import (
	"encoding/json"
	"strings"
	"time"
)

// AuthPolicy is ProxyConfig.controlPlaneAuthPolicy.
type AuthPolicy string

const (
	// AuthNone talks to the control plane in plaintext.
	AuthNone AuthPolicy = "NONE"
	// AuthMutualTLS talks to the control plane over TLS (the default).
	AuthMutualTLS AuthPolicy = "MUTUAL_TLS"
)

// TracingServiceName is ProxyConfig.tracingServiceName: how node.cluster is
// derived when serviceCluster is not used.
type TracingServiceName string

const (
	TracingAppLabelAndNamespace      TracingServiceName = "APP_LABEL_AND_NAMESPACE"
	TracingCanonicalNameOnly         TracingServiceName = "CANONICAL_NAME_ONLY"
	TracingCanonicalNameAndNamespace TracingServiceName = "CANONICAL_NAME_AND_NAMESPACE"
)

// InterceptionMode is ProxyConfig.interceptionMode.
type InterceptionMode string

const (
	InterceptRedirect InterceptionMode = "REDIRECT"
	InterceptTPROXY   InterceptionMode = "TPROXY"
	InterceptNone     InterceptionMode = "NONE"
)

// StatsMatcher is ProxyConfig.proxyStatsMatcher: extra Envoy stats to keep.
type StatsMatcher struct {
	InclusionPrefixes []string `json:"inclusionPrefixes,omitempty"`
	InclusionSuffixes []string `json:"inclusionSuffixes,omitempty"`
	InclusionRegexps  []string `json:"inclusionRegexps,omitempty"`
}

// ProxyConfig is the subset of Istio's mesh.v1alpha1.ProxyConfig the agent
// uses, typed. Go field names match Istio's generated ones, so custom
// bootstrap templates that say {{ .config.ProxyAdminPort }} keep working.
// Fields Istio defines but the agent does not interpret are kept verbatim in
// Passthrough so they still reach the control plane in node metadata.
//
// Defaults live in Defaults(); the JSON name of each field is the one in
// PROXY_CONFIG, the mesh config's defaultConfig and the proxy.istio.io/config
// annotation.
type ProxyConfig struct {
	// ConfigPath (configPath) is where the bootstrap and the XDS socket go.
	// Default ./etc/istio/proxy.
	ConfigPath string
	// BinaryPath (binaryPath) is the Envoy binary. Default /usr/local/bin/envoy.
	BinaryPath string
	// ServiceCluster (serviceCluster) names node.cluster; "istio-proxy" means
	// "derive from the app label". Default from --serviceCluster (istio-proxy).
	// Setting TracingServiceName clears it (they are a oneof in Istio).
	ServiceCluster string
	// TracingServiceName (tracingServiceName) is the other arm of the oneof.
	TracingServiceName TracingServiceName
	// DrainDuration (drainDuration) is Envoy's --drain-time-s. Default 45s.
	DrainDuration time.Duration
	// ParentShutdownDuration (parentShutdownDuration) is deprecated in Istio
	// and unused; accepted so existing configs parse.
	ParentShutdownDuration time.Duration
	// TerminationDrainDuration (terminationDrainDuration) is how long the agent
	// waits after draining before stopping Envoy. Default 5s. No env var.
	TerminationDrainDuration time.Duration
	// DiscoveryAddress (discoveryAddress) is the control plane, host:port.
	// Default istiod.istio-system.svc:15012. The annotation
	// sidecar.istio.io/discoveryAddress overrides it.
	DiscoveryAddress string
	// ProxyAdminPort (proxyAdminPort) is Envoy's admin port on localhost. Default 15000.
	ProxyAdminPort uint16
	// ControlPlaneAuthPolicy (controlPlaneAuthPolicy). Default MUTUAL_TLS.
	ControlPlaneAuthPolicy AuthPolicy
	// CustomConfigFile (customConfigFile) is an Envoy config used as-is instead
	// of a generated bootstrap.
	CustomConfigFile string
	// StatNameLength (statNameLength). Default 189.
	StatNameLength int32
	// Concurrency (concurrency) is Envoy's worker count; nil when unset, 0
	// means Envoy's default (one per CPU). See Load for the precedence.
	Concurrency *int32
	// ProxyBootstrapTemplatePath (proxyBootstrapTemplatePath) is a Go
	// text/template for the bootstrap; --templateFile sets it.
	ProxyBootstrapTemplatePath string
	// StatusPort (statusPort) is the agent's status server port. Default
	// 15020. The annotation status.sidecar.istio.io/port overrides it.
	StatusPort uint16
	// ProxyMetadata (proxyMetadata) are extra env-like settings; keys with
	// the ISTIO_META_ prefix become node metadata. Merged across sources.
	ProxyMetadata map[string]string
	// RuntimeValues (runtimeValues) are Envoy runtime flags; "" removes a
	// default flag, "true"/"false" become booleans.
	RuntimeValues map[string]string
	// HoldApplicationUntilProxyStarts (holdApplicationUntilProxyStarts) is
	// used by the injector only; nil when unset.
	HoldApplicationUntilProxyStarts *bool
	// ExtraStatTags (extraStatTags) are extra Envoy stats tags.
	ExtraStatTags []string
	// ProxyStatsMatcher (proxyStatsMatcher); nil when unset.
	ProxyStatsMatcher *StatsMatcher
	// MeshID (meshId).
	MeshID string
	// CACertificatesPEM (caCertificatesPem) are extra trusted roots.
	CACertificatesPEM []string
	// InterceptionMode (interceptionMode); empty when unset (REDIRECT).
	InterceptionMode InterceptionMode
	// FileFlushInterval (fileFlushInterval) is Envoy's
	// --file-flush-interval-msec; 0 when unset (Envoy flag default 1000ms).
	FileFlushInterval time.Duration
	// FileFlushMinSizeKB (fileFlushMinSizeKb) is Envoy's
	// --file-flush-min-size-kb; 0 when unset.
	FileFlushMinSizeKB uint32

	// ReadinessProbe (readinessProbe), kept as raw JSON for the health checker.
	ReadinessProbe json.RawMessage
	// Tracing (tracing), raw JSON.
	Tracing json.RawMessage
	// GatewayTopology (gatewayTopology), raw JSON.
	GatewayTopology json.RawMessage
	// PrivateKeyProvider (privateKeyProvider), raw JSON.
	PrivateKeyProvider json.RawMessage
	// ProxyHeaders (proxyHeaders), raw JSON.
	ProxyHeaders json.RawMessage

	// Passthrough holds the other ProxyConfig fields Istio defines (image,
	// envoyAccessLogService, statsdUdpAddress, ...) verbatim, by JSON name.
	Passthrough map[string]json.RawMessage
}

// Default values, as Istio's DefaultProxyConfig.
const (
	DefaultConfigPath               = "./etc/istio/proxy"
	DefaultBinaryPath               = "/usr/local/bin/envoy"
	DefaultServiceCluster           = "istio-proxy"
	DefaultDrainDuration            = 45 * time.Second
	DefaultTerminationDrainDuration = 5 * time.Second
	DefaultDiscoveryAddress         = "istiod.istio-system.svc:15012"
	DefaultProxyAdminPort           = 15000
	DefaultStatusPort               = 15020
	DefaultStatNameLength           = 189
)

// Defaults returns the ProxyConfig every merge starts from (Istio's
// DefaultProxyConfig at the reference commit).
func Defaults() *ProxyConfig {
	return &ProxyConfig{
		ConfigPath:               DefaultConfigPath,
		BinaryPath:               DefaultBinaryPath,
		ServiceCluster:           DefaultServiceCluster,
		DrainDuration:            DefaultDrainDuration,
		TerminationDrainDuration: DefaultTerminationDrainDuration,
		DiscoveryAddress:         DefaultDiscoveryAddress,
		ProxyAdminPort:           DefaultProxyAdminPort,
		ControlPlaneAuthPolicy:   AuthMutualTLS,
		StatNameLength:           DefaultStatNameLength,
		StatusPort:               DefaultStatusPort,
	}
}

// Clone returns a deep copy.
func (p *ProxyConfig) Clone() *ProxyConfig {
	c := *p
	c.ProxyMetadata = cloneMap(p.ProxyMetadata)
	c.RuntimeValues = cloneMap(p.RuntimeValues)
	if p.Concurrency != nil {
		v := *p.Concurrency
		c.Concurrency = &v
	}
	if p.HoldApplicationUntilProxyStarts != nil {
		v := *p.HoldApplicationUntilProxyStarts
		c.HoldApplicationUntilProxyStarts = &v
	}
	c.ExtraStatTags = append([]string(nil), p.ExtraStatTags...)
	c.CACertificatesPEM = append([]string(nil), p.CACertificatesPEM...)
	if p.ProxyStatsMatcher != nil {
		m := StatsMatcher{
			InclusionPrefixes: append([]string(nil), p.ProxyStatsMatcher.InclusionPrefixes...),
			InclusionSuffixes: append([]string(nil), p.ProxyStatsMatcher.InclusionSuffixes...),
			InclusionRegexps:  append([]string(nil), p.ProxyStatsMatcher.InclusionRegexps...),
		}
		c.ProxyStatsMatcher = &m
	}
	if p.Passthrough != nil {
		c.Passthrough = make(map[string]json.RawMessage, len(p.Passthrough))
		for k, v := range p.Passthrough {
			c.Passthrough[k] = v
		}
	}
	return &c
}

// XDSSocketPath is the unix socket the xDS proxy serves and Envoy's
// xds-grpc cluster dials: <configPath>/XDS.
func (p *ProxyConfig) XDSSocketPath() string {
	return strings.TrimSuffix(p.ConfigPath, "/") + "/" + DefaultXDSSocketName
}

// BootstrapPath is where the generated bootstrap goes: <configPath>/envoy-rev.json.
func (p *ProxyConfig) BootstrapPath() string {
	return strings.TrimSuffix(p.ConfigPath, "/") + "/" + DefaultBootstrapName
}

// ConcurrencyValue is the effective worker count (0 = Envoy's default).
func (p *ProxyConfig) ConcurrencyValue() int {
	if p.Concurrency == nil {
		return 0
	}
	return int(*p.Concurrency)
}

func cloneMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	c := make(map[string]string, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}
