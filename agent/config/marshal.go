package config

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
	"sigs.k8s.io/yaml"
)

// MarshalJSON renders p in the protobuf JSON shape Istio uses for
// ProxyConfig (lowerCamel names, durations as "45s", zero values and the
// zero enum value omitted), which is what the control plane parses from the
// PROXY_CONFIG node metadata.
func (p *ProxyConfig) MarshalJSON() ([]byte, error) {
	return json.Marshal(p.toMap())
}

// toMap is the JSON object form of p (keys sorted by encoding/json).
func (p *ProxyConfig) toMap() map[string]any {
	m := map[string]any{}
	putStr := func(k, v string) {
		if v != "" {
			m[k] = v
		}
	}
	putDur := func(k string, v time.Duration) {
		if v != 0 {
			m[k] = FormatDuration(v)
		}
	}
	putInt := func(k string, v int64) {
		if v != 0 {
			m[k] = v
		}
	}
	putRaw := func(k string, v json.RawMessage) {
		if len(v) > 0 {
			m[k] = v
		}
	}
	putStr("configPath", p.ConfigPath)
	putStr("binaryPath", p.BinaryPath)
	putStr("serviceCluster", p.ServiceCluster)
	putStr("tracingServiceName", string(p.TracingServiceName))
	putDur("drainDuration", p.DrainDuration)
	putDur("parentShutdownDuration", p.ParentShutdownDuration)
	putDur("terminationDrainDuration", p.TerminationDrainDuration)
	putStr("discoveryAddress", p.DiscoveryAddress)
	putInt("proxyAdminPort", int64(p.ProxyAdminPort))
	if p.ControlPlaneAuthPolicy != AuthNone {
		putStr("controlPlaneAuthPolicy", string(p.ControlPlaneAuthPolicy))
	}
	putStr("customConfigFile", p.CustomConfigFile)
	putInt("statNameLength", int64(p.StatNameLength))
	if p.Concurrency != nil {
		m["concurrency"] = *p.Concurrency
	}
	putStr("proxyBootstrapTemplatePath", p.ProxyBootstrapTemplatePath)
	putInt("statusPort", int64(p.StatusPort))
	if len(p.ProxyMetadata) > 0 {
		m["proxyMetadata"] = p.ProxyMetadata
	}
	if len(p.RuntimeValues) > 0 {
		m["runtimeValues"] = p.RuntimeValues
	}
	if p.HoldApplicationUntilProxyStarts != nil {
		m["holdApplicationUntilProxyStarts"] = *p.HoldApplicationUntilProxyStarts
	}
	if len(p.ExtraStatTags) > 0 {
		m["extraStatTags"] = p.ExtraStatTags
	}
	if p.ProxyStatsMatcher != nil {
		m["proxyStatsMatcher"] = p.ProxyStatsMatcher
	}
	putStr("meshId", p.MeshID)
	if len(p.CACertificatesPEM) > 0 {
		m["caCertificatesPem"] = p.CACertificatesPEM
	}
	if p.InterceptionMode != "" && p.InterceptionMode != InterceptRedirect {
		m["interceptionMode"] = string(p.InterceptionMode)
	}
	putDur("fileFlushInterval", p.FileFlushInterval)
	putInt("fileFlushMinSizeKb", int64(p.FileFlushMinSizeKB))
	putRaw("readinessProbe", p.ReadinessProbe)
	putRaw("tracing", p.Tracing)
	putRaw("gatewayTopology", p.GatewayTopology)
	putRaw("privateKeyProvider", p.PrivateKeyProvider)
	putRaw("proxyHeaders", p.ProxyHeaders)
	for k, v := range p.Passthrough {
		m[k] = v
	}
	return m
}

// FormatDuration renders d as a protobuf JSON duration: seconds with 0, 3,
// 6 or 9 fractional digits ("45s", "0.500s").
func FormatDuration(d time.Duration) string {
	sign := ""
	if d < 0 {
		sign, d = "-", -d
	}
	sec, ns := int64(d/time.Second), int64(d%time.Second)
	switch {
	case ns == 0:
		return fmt.Sprintf("%s%ds", sign, sec)
	case ns%1e6 == 0:
		return fmt.Sprintf("%s%d.%03ds", sign, sec, ns/1e6)
	case ns%1e3 == 0:
		return fmt.Sprintf("%s%d.%06ds", sign, sec, ns/1e3)
	}
	return fmt.Sprintf("%s%d.%09ds", sign, sec, ns)
}

// String renders the effective config as YAML, as the agent logs it at start.
func (p *ProxyConfig) String() string {
	js, err := p.MarshalJSON()
	if err != nil {
		return fmt.Sprintf("<%v>", err)
	}
	y, err := yaml.JSONToYAML(js)
	if err != nil {
		return string(js)
	}
	return strings.TrimRight(string(y), "\n")
}

// Log logs the effective config once, at info, as Istio does at start.
func (p *ProxyConfig) Log(log *zap.Logger) {
	log.Info("effective ProxyConfig:\n" + p.String())
}
