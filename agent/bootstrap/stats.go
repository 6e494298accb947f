package bootstrap

import (
	"encoding/json"
	"math"
	"sort"
	"strconv"
	"strings"

	"github.com/outrigger-mesh/outrigger/agent/config"
)

// Pod annotations that tune the stats config (Istio's names).
const (
	annoStatsPrefixes  = "sidecar.istio.io/statsInclusionPrefixes"
	annoStatsSuffixes  = "sidecar.istio.io/statsInclusionSuffixes"
	annoStatsRegexps   = "sidecar.istio.io/statsInclusionRegexps"
	annoExtraStatTags  = "sidecar.istio.io/extraStatTags"
	annoHistogramBuckt = "sidecar.istio.io/statsHistogramBuckets"
)

// Stats the readiness probe and drain loop read must always exist.
var (
	requiredPrefixes = []string{"cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm"}
	rbacSuffixes     = []string{"rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied"}
	requiredRegexps  = []string{`vhost\..*\.route\..*`}
)

// statsOptions are the inclusion patterns and tags of stats_config.
type statsOptions struct {
	prefixes, suffixes, regexps, extraTags []string
	buckets                                []histogramBucket
}

type histogramBucket struct {
	prefix  string
	buckets []float64
}

// buildStats follows Istio: an annotation replaces the ProxyConfig's list
// (they are not merged), the required entries are always appended, and
// "{pod_ip}" expands to each node IP.
func buildStats(p Params) statsOptions {
	annos := annotations(p.Node)
	var pc config.StatsMatcher
	if p.Proxy.ProxyStatsMatcher != nil {
		pc = *p.Proxy.ProxyStatsMatcher
	}
	ips := make([]string, len(p.Node.IPs))
	for i, a := range p.Node.IPs {
		ips[i] = a.String()
	}
	pick := func(anno string, fromPC, required []string) []string {
		var out []string
		if v := annos[anno]; v != "" {
			out = strings.Split(v, ",")
		} else {
			out = append(out, fromPC...)
		}
		out = append(out, required...)
		return expandPodIP(out, ips)
	}
	suffixes := rbacSuffixes
	if p.ExitOnZeroActiveConnections {
		suffixes = append(append([]string(nil), rbacSuffixes...), "downstream_cx_active")
	}
	var tags []string
	seen := map[string]bool{}
	for _, t := range append(append([]string(nil), p.Proxy.ExtraStatTags...), strings.Split(annos[annoExtraStatTags], ",")...) {
		if t != "" && !seen[t] {
			seen[t] = true
			tags = append(tags, t)
		}
	}
	return statsOptions{
		prefixes:  pick(annoStatsPrefixes, pc.InclusionPrefixes, requiredPrefixes),
		suffixes:  pick(annoStatsSuffixes, pc.InclusionSuffixes, suffixes),
		regexps:   pick(annoStatsRegexps, pc.InclusionRegexps, requiredRegexps),
		extraTags: tags,
		buckets:   histogramBuckets(annos[annoHistogramBuckt]),
	}
}

func expandPodIP(patterns, ips []string) []string {
	out := make([]string, 0, len(patterns))
	for _, p := range patterns {
		if !strings.Contains(p, "{pod_ip}") {
			out = append(out, p)
			continue
		}
		for _, ip := range ips {
			out = append(out, strings.ReplaceAll(p, "{pod_ip}", ip))
		}
	}
	return out
}

// histogramBuckets parses the statsHistogramBuckets annotation
// ({"prefix": [buckets...]}); a bad value is ignored, as in Istio.
func histogramBuckets(v string) []histogramBucket {
	if v == "" {
		return nil
	}
	var m map[string][]float64
	if err := json.Unmarshal([]byte(v), &m); err != nil {
		return nil
	}
	out := make([]histogramBucket, 0, len(m))
	for k, b := range m {
		out = append(out, histogramBucket{prefix: k, buckets: b})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].prefix < out[j].prefix })
	return out
}

func annotations(n *config.Node) map[string]string {
	if n == nil {
		return nil
	}
	m, _ := n.Metadata["ANNOTATIONS"].(map[string]string)
	return m
}

// statsTags are Istio's tag extraction regexes (Envoy std::regex syntax);
// extra tags go between mongo_prefix and cache, as in Istio.
func statsTags(extra []string) [][2]string {
	tags := [][2]string{
		{"cluster_name", `^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)`},
		{"tcp_prefix", `^tcp\.((.*?)\.)\w+?$`},
		{"response_code", `_rq(_(\d{3}))$`},
		{"response_code_class", `_rq(_(\dxx))$`},
		{"http_conn_manager_listener_prefix", `^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)`},
		{"http_conn_manager_prefix", `^http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)`},
		{"listener_address", `^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)`},
		{"mongo_prefix", `^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$`},
	}
	for _, t := range extra {
		tags = append(tags, [2]string{t, `(` + t + `=\.=(.*?);\.;)`})
	}
	return append(tags,
		[2]string{"cache", `(cache\.(.+?)\.)`},
		[2]string{"component", `(component\.(.+?)\.)`},
		[2]string{"tag", `(tag\.(.+?);\.)`},
		[2]string{"wasm_filter", `(wasm_filter\.(.+?)\.)`},
		[2]string{"authz_enforce_result", `rbac(\.(allowed|denied))`},
		[2]string{"authz_dry_run_action", `(\.istio_dry_run_(allow|deny)_)`},
		[2]string{"authz_dry_run_result", `(\.shadow_(allowed|denied))`},
	)
}

// runtimeFlags are the static runtime layer: Istio's defaults, then
// runtimeValues ("" deletes a flag; "true"/"false" become booleans because
// Envoy no longer accepts booleans as strings).
func runtimeFlags(p Params) map[string]any {
	flags := map[string]any{
		"re2.max_program_size.error_level": "32768",
		"envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst": true,
		"envoy.reloadable_features.http_reject_path_with_fragment":                                             false,
		"envoy.reloadable_features.fixed_heap_use_allocated":                                                   true,
		"envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update":                                       false,
	}
	if !p.StripFragment {
		// The name reads backwards; Istio kept it for compatibility.
		flags["envoy.reloadable_features.http_strip_fragment_from_path_unsafe_if_disabled"] = "false"
	}
	for k, v := range p.Proxy.RuntimeValues {
		switch v {
		case "":
			delete(flags, k)
		case "true":
			flags[k] = true
		case "false":
			flags[k] = false
		default:
			flags[k] = v
		}
	}
	return flags
}

// maxDownstreamConnections is the overload manager's global connection cap:
// proxyMetadata ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS, else MaxInt32.
func maxDownstreamConnections(p Params) int64 {
	if v, ok := p.Proxy.ProxyMetadata["ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS"]; ok {
		if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil && n > 0 {
			return n
		}
	}
	return math.MaxInt32
}
