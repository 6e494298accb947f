package bootstrap

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"text/template"

	"github.com/outrigger-mesh/outrigger/agent/config"
)

// TemplatePath is the bootstrap template to render, by Istio's precedence:
// ISTIO_BOOTSTRAP, then proxyBootstrapTemplatePath (--templateFile). ""
// means the built-in bootstrap. Istio's last fallback, the packaged
// ./var/lib/istio/envoy/envoy_bootstrap_tmpl.json, is deliberately not used:
// it declares the 15021 listener that the agent serves itself.
func TemplatePath(p Params) string {
	if p.TemplateEnv != "" {
		return p.TemplateEnv
	}
	return p.Proxy.ProxyBootstrapTemplatePath
}

// formatOf is "yaml" for *.yaml, *.yml and *.yaml.tmpl, else "json".
func formatOf(path string) string {
	p := strings.TrimSuffix(path, ".tmpl")
	if strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml") {
		return "yaml"
	}
	return "json"
}

func renderTemplate(p Params, path string) ([]byte, string, error) {
	src := "proxyBootstrapTemplatePath/--templateFile"
	if p.TemplateEnv != "" {
		src = "ISTIO_BOOTSTRAP"
	}
	text, err := os.ReadFile(config.Rooted(p.Root, path))
	if err != nil {
		return nil, "", fmt.Errorf("bootstrap template (%s): %w", src, err)
	}
	data, err := Render(string(text), path, p)
	if err != nil {
		return nil, "", fmt.Errorf("bootstrap template %s (%s): %w", path, src, err)
	}
	return data, formatOf(path), nil
}

// Render executes a bootstrap template with TemplateParams(p).
func Render(text, name string, p Params) ([]byte, error) {
	tmpl, err := template.New(name).Funcs(templateFuncs).Parse(text)
	if err != nil {
		return nil, err
	}
	params, err := TemplateParams(p)
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	if err := tmpl.Execute(&out, params); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

var templateFuncs = template.FuncMap{
	"toJson": toJSON,
	"toJSON": toJSON,
	// default and quote behave like the sprig functions Istio's templates use.
	"default": func(def, v any) any {
		if v == nil || v == "" || v == false || v == 0 {
			return def
		}
		return v
	},
	"quote": func(v any) string { return strconv.Quote(fmt.Sprint(v)) },
}

func toJSON(v any) (string, error) {
	b, err := json.Marshal(v)
	return string(b), err
}

// TemplateParams are the values a custom template sees; the keys follow
// Istio's bootstrap template where they exist (docs/proxy-config.md lists
// them). Keys whose value would be empty are left out, as in Istio, so
// {{ if .region }} works.
func TemplateParams(p Params) (map[string]any, error) {
	if err := p.check(); err != nil {
		return nil, err
	}
	fam := familyOf(p.Node.IPs, p.DualStack)
	metaJSON, err := p.Node.MetadataJSON()
	if err != nil {
		return nil, fmt.Errorf("node metadata: %w", err)
	}
	flagsJSON, err := json.Marshal(runtimeFlags(p))
	if err != nil {
		return nil, err
	}
	maxConns, err := maxConnections(p)
	if err != nil {
		return nil, err
	}
	xdsType := "GRPC"
	if p.Delta || p.Node.Type == config.Waypoint {
		xdsType = "DELTA_GRPC"
	}
	stats := buildStats(p)
	discHost, discPort, _ := net.SplitHostPort(p.Proxy.DiscoveryAddress)
	nodeType, _, _ := strings.Cut(p.Node.ID, "~")

	m := map[string]any{
		"config":                     p.Proxy,
		"nodeID":                     p.Node.ID,
		"nodeType":                   nodeType,
		"cluster":                    p.Node.Cluster,
		"meta_json_str":              string(metaJSON),
		"runtime_flags":              string(flagsJSON),
		"localhost":                  fam.localhost,
		"wildcard":                   fam.wildcard,
		"dns_lookup_family":          fam.dnsLookupFamily,
		"xds_type":                   xdsType,
		"discovery_address":          p.Proxy.DiscoveryAddress,
		"discovery_host":             discHost,
		"envoy_status_port":          int(p.EnvoyStatusPort),
		"envoy_prometheus_port":      int(p.EnvoyPrometheusPort),
		"sds_socket_path":            p.SDSSocketPath,
		"max_downstream_connections": maxConns,
		"metadata_discovery":         p.MetadataDiscovery && xdsType == "DELTA_GRPC",
		"log_json":                   p.LogAsJSON,
	}
	if discPort != "" {
		m["pilot_grpc_address"] = fmt.Sprintf(`{"address": %q, "port_value": %s}`, discHost, discPort)
	}
	set := func(k string, v string) {
		if v != "" {
			m[k] = v
		}
	}
	set("region", p.Node.Locality.Region)
	set("zone", p.Node.Locality.Zone)
	set("sub_zone", p.Node.Locality.SubZone)
	set("outlier_log_path", p.OutlierLogPath)
	if fam.dualStack {
		m["dual_stack"] = true
		m["additional_wildcard"] = fam.additionalWildcard
	}
	if v, _ := p.Node.Metadata["STS_PORT"].(string); v != "" {
		m["sts_port"] = v
	}
	if san, _ := p.Node.Metadata["PILOT_SAN"].([]string); len(san) > 0 {
		exact := make([]map[string]string, len(san))
		for i, s := range san {
			exact[i] = map[string]string{"exact": s}
		}
		js, _ := json.Marshal(exact)
		m["pilot_SAN"] = string(js)
	}
	lists := map[string][]string{
		"extraStatTags":    stats.extraTags,
		"inclusionPrefix":  stats.prefixes,
		"inclusionSuffix":  stats.suffixes,
		"inclusionRegexps": stats.regexps,
	}
	for k, v := range lists {
		if len(v) > 0 {
			m[k] = v
		}
	}
	if len(stats.buckets) > 0 {
		var hb []map[string]any
		for _, b := range stats.buckets {
			hb = append(hb, map[string]any{"match": map[string]string{"prefix": b.prefix}, "buckets": b.buckets})
		}
		m["histogram_buckets"] = hb
	}
	return m, nil
}
