package config

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// ValueError is a bad value in one configuration source. Its message names
// the source, the field and the value, e.g.
//
//	PROXY_CONFIG: field drainDuration: "5 seconds" is not a duration (use e.g. "45s")
type ValueError struct {
	Source string // "PROXY_CONFIG", "mesh config ./etc/istio/config/mesh", ...
	Field  string // JSON name, dotted for nested fields
	Err    error
}

func (e *ValueError) Error() string {
	if e.Field == "" {
		return fmt.Sprintf("%s: %v", e.Source, e.Err)
	}
	return fmt.Sprintf("%s: field %s: %v", e.Source, e.Field, e.Err)
}

func (e *ValueError) Unwrap() error { return e.Err }

// Warning is a non-fatal finding while parsing a source (an unknown field, a
// value coerced to a string).
type Warning struct {
	Source, Field, Message string
}

func (w Warning) String() string {
	return fmt.Sprintf("%s: field %s: %s", w.Source, w.Field, w.Message)
}

// overlay applies one ProxyConfig document to p with Istio's merge rules:
// every field present in the document replaces the current value (lists,
// maps and nested messages included), except proxyMetadata, whose keys are
// merged over the current ones. null leaves a field unchanged.
func overlay(p *ProxyConfig, source string, doc []byte) ([]Warning, error) {
	js, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return nil, &ValueError{Source: source, Err: fmt.Errorf("not valid YAML or JSON: %w", err)}
	}
	js = bytes.TrimSpace(js)
	if len(js) == 0 || string(js) == "null" {
		return nil, nil
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(js, &obj); err != nil {
		return nil, &ValueError{Source: source, Err: fmt.Errorf("want a ProxyConfig object, got %s", preview(js))}
	}
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var warns []Warning
	for _, k := range keys {
		raw := obj[k]
		name := canonicalName(k)
		f, ok := fieldsByName[name]
		if !ok {
			if passthroughFields[name] {
				if !isNull(raw) {
					if p.Passthrough == nil {
						p.Passthrough = map[string]json.RawMessage{}
					}
					p.Passthrough[name] = compact(raw)
				}
				continue
			}
			warns = append(warns, Warning{Source: source, Field: k, Message: "unknown ProxyConfig field, ignored"})
			continue
		}
		if isNull(raw) {
			continue
		}
		w, err := f.parse(p, raw)
		if err != nil {
			return warns, &ValueError{Source: source, Field: name, Err: err}
		}
		for _, m := range w {
			warns = append(warns, Warning{Source: source, Field: name, Message: m})
		}
	}
	return warns, nil
}

// canonicalName maps a proto field name (snake_case, accepted by Istio's
// JSON decoder) to its JSON name.
func canonicalName(k string) string {
	if !strings.Contains(k, "_") {
		return k
	}
	var b strings.Builder
	up := false
	for _, r := range k {
		if r == '_' {
			up = true
			continue
		}
		if up {
			b.WriteString(strings.ToUpper(string(r)))
			up = false
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// parseFunc parses one field's JSON value into p; it returns warnings.
type parseFunc func(p *ProxyConfig, raw json.RawMessage) ([]string, error)

type fieldSpec struct {
	name  string
	parse parseFunc
}

var fieldsByName = func() map[string]fieldSpec {
	specs := []fieldSpec{
		{"configPath", str(func(p *ProxyConfig, v string) { p.ConfigPath = v })},
		{"binaryPath", str(func(p *ProxyConfig, v string) { p.BinaryPath = v })},
		{"serviceCluster", str(func(p *ProxyConfig, v string) { p.ServiceCluster = v; p.TracingServiceName = "" })},
		{"tracingServiceName", enum([]string{"APP_LABEL_AND_NAMESPACE", "CANONICAL_NAME_ONLY", "CANONICAL_NAME_AND_NAMESPACE"},
			func(p *ProxyConfig, v string) { p.TracingServiceName = TracingServiceName(v); p.ServiceCluster = "" })},
		{"drainDuration", dur(func(p *ProxyConfig, v time.Duration) { p.DrainDuration = v })},
		{"parentShutdownDuration", dur(func(p *ProxyConfig, v time.Duration) { p.ParentShutdownDuration = v })},
		{"terminationDrainDuration", dur(func(p *ProxyConfig, v time.Duration) { p.TerminationDrainDuration = v })},
		{"discoveryAddress", str(func(p *ProxyConfig, v string) { p.DiscoveryAddress = v })},
		{"proxyAdminPort", port(func(p *ProxyConfig, v uint16) { p.ProxyAdminPort = v })},
		{"controlPlaneAuthPolicy", enum([]string{"NONE", "MUTUAL_TLS"},
			func(p *ProxyConfig, v string) { p.ControlPlaneAuthPolicy = AuthPolicy(v) })},
		{"customConfigFile", str(func(p *ProxyConfig, v string) { p.CustomConfigFile = v })},
		{"statNameLength", integer(0, math.MaxInt32, func(p *ProxyConfig, v int64) { p.StatNameLength = int32(v) })},
		{"concurrency", integer(0, math.MaxInt32, func(p *ProxyConfig, v int64) { c := int32(v); p.Concurrency = &c })},
		{"proxyBootstrapTemplatePath", str(func(p *ProxyConfig, v string) { p.ProxyBootstrapTemplatePath = v })},
		{"statusPort", port(func(p *ProxyConfig, v uint16) { p.StatusPort = v })},
		{"proxyMetadata", strMap(func(p *ProxyConfig, v map[string]string) {
			if p.ProxyMetadata == nil {
				p.ProxyMetadata = map[string]string{}
			}
			for k, val := range v {
				p.ProxyMetadata[k] = val
			}
		})},
		{"runtimeValues", strMap(func(p *ProxyConfig, v map[string]string) { p.RuntimeValues = v })},
		{"holdApplicationUntilProxyStarts", boolean(func(p *ProxyConfig, v bool) { p.HoldApplicationUntilProxyStarts = &v })},
		{"extraStatTags", strList(func(p *ProxyConfig, v []string) { p.ExtraStatTags = v })},
		{"proxyStatsMatcher", statsMatcher},
		{"meshId", str(func(p *ProxyConfig, v string) { p.MeshID = v })},
		{"caCertificatesPem", strList(func(p *ProxyConfig, v []string) { p.CACertificatesPEM = v })},
		{"interceptionMode", enum([]string{"REDIRECT", "TPROXY", "NONE"},
			func(p *ProxyConfig, v string) { p.InterceptionMode = InterceptionMode(v) })},
		{"fileFlushInterval", dur(func(p *ProxyConfig, v time.Duration) { p.FileFlushInterval = v })},
		{"fileFlushMinSizeKb", integer(0, math.MaxUint32, func(p *ProxyConfig, v int64) { p.FileFlushMinSizeKB = uint32(v) })},
		{"readinessProbe", rawJSON(func(p *ProxyConfig, v json.RawMessage) { p.ReadinessProbe = v })},
		{"tracing", rawJSON(func(p *ProxyConfig, v json.RawMessage) { p.Tracing = v })},
		{"gatewayTopology", rawJSON(func(p *ProxyConfig, v json.RawMessage) { p.GatewayTopology = v })},
		{"privateKeyProvider", rawJSON(func(p *ProxyConfig, v json.RawMessage) { p.PrivateKeyProvider = v })},
		{"proxyHeaders", rawJSON(func(p *ProxyConfig, v json.RawMessage) { p.ProxyHeaders = v })},
	}
	m := make(map[string]fieldSpec, len(specs))
	for _, s := range specs {
		m[s.name] = s
	}
	return m
}()

// passthroughFields are ProxyConfig fields Istio defines that the agent does
// not interpret; they are kept verbatim for the control plane.
var passthroughFields = map[string]bool{
	"discoveryRefreshDelay":      true,
	"zipkinAddress":              true,
	"statsdUdpAddress":           true,
	"envoyMetricsServiceAddress": true,
	"availabilityZone":           true,
	"sds":                        true,
	"envoyAccessLogService":      true,
	"envoyMetricsService":        true,
	"image":                      true,
	"trustDomainsInSAN":          true,
}

func str(set func(*ProxyConfig, string)) parseFunc {
	return func(p *ProxyConfig, raw json.RawMessage) ([]string, error) {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("%s is not a string", preview(raw))
		}
		set(p, s)
		return nil, nil
	}
}

// protoDuration is the protobuf JSON form of a Duration: decimal seconds.
var protoDuration = regexp.MustCompile(`^(-?)(\d+)(?:\.(\d{1,9}))?s$`)

// ParseDuration parses a protobuf JSON duration ("45s", "0.5s") or, as a
// convenience Istio does not offer, a Go duration ("1m30s").
func ParseDuration(s string) (time.Duration, error) {
	bad := fmt.Errorf("%q is not a duration (use e.g. \"45s\")", s)
	if m := protoDuration.FindStringSubmatch(s); m != nil {
		sec, err := strconv.ParseInt(m[2], 10, 64)
		if err != nil || sec > math.MaxInt64/int64(time.Second) {
			return 0, bad
		}
		d := time.Duration(sec) * time.Second
		if m[3] != "" {
			frac := m[3] + strings.Repeat("0", 9-len(m[3]))
			ns, _ := strconv.ParseInt(frac, 10, 64)
			d += time.Duration(ns)
		}
		if m[1] == "-" {
			d = -d
		}
		return d, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || s == "" {
		return 0, bad
	}
	return d, nil
}

func dur(set func(*ProxyConfig, time.Duration)) parseFunc {
	return func(p *ProxyConfig, raw json.RawMessage) ([]string, error) {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("%s is not a duration (use e.g. \"45s\")", preview(raw))
		}
		d, err := ParseDuration(s)
		if err != nil {
			return nil, err
		}
		set(p, d)
		return nil, nil
	}
}

// parseInt accepts a JSON number or a quoted integer, as protobuf JSON does.
func parseInt(raw json.RawMessage) (int64, error) {
	s := string(bytes.TrimSpace(raw))
	if strings.HasPrefix(s, `"`) {
		if err := json.Unmarshal(raw, &s); err != nil {
			return 0, err
		}
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return n, nil
	}
	// 2.0 and 1e3 are integral numbers in JSON.
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f != math.Trunc(f) || math.Abs(f) > 1<<53 {
		return 0, fmt.Errorf("not an integer")
	}
	return int64(f), nil
}

func integer(lo, hi int64, set func(*ProxyConfig, int64)) parseFunc {
	return func(p *ProxyConfig, raw json.RawMessage) ([]string, error) {
		n, err := parseInt(raw)
		if err != nil {
			return nil, fmt.Errorf("%s is not an integer", preview(raw))
		}
		if n < lo || n > hi {
			return nil, fmt.Errorf("%d is out of range (%d-%d)", n, lo, hi)
		}
		set(p, n)
		return nil, nil
	}
}

func port(set func(*ProxyConfig, uint16)) parseFunc {
	return func(p *ProxyConfig, raw json.RawMessage) ([]string, error) {
		n, err := parseInt(raw)
		if err != nil || n < 0 || n > 65535 {
			return nil, fmt.Errorf("%s is not a port (use 1-65535)", preview(raw))
		}
		set(p, uint16(n))
		return nil, nil
	}
}

func boolean(set func(*ProxyConfig, bool)) parseFunc {
	return func(p *ProxyConfig, raw json.RawMessage) ([]string, error) {
		var b bool
		if err := json.Unmarshal(raw, &b); err != nil {
			return nil, fmt.Errorf("%s is not a boolean (use true or false)", preview(raw))
		}
		set(p, b)
		return nil, nil
	}
}

func enum(allowed []string, set func(*ProxyConfig, string)) parseFunc {
	return func(p *ProxyConfig, raw json.RawMessage) ([]string, error) {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			// protobuf JSON also accepts the enum number.
			n, nerr := parseInt(raw)
			if nerr != nil || n < 0 || int(n) >= len(allowed) {
				return nil, fmt.Errorf("%s is not one of %s", preview(raw), strings.Join(allowed, ", "))
			}
			s = allowed[n]
		}
		for _, a := range allowed {
			if s == a {
				set(p, s)
				return nil, nil
			}
		}
		return nil, fmt.Errorf("%q is not one of %s", s, strings.Join(allowed, ", "))
	}
}

func strMap(set func(*ProxyConfig, map[string]string)) parseFunc {
	return func(p *ProxyConfig, raw json.RawMessage) ([]string, error) {
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(raw, &obj); err != nil {
			return nil, fmt.Errorf("%s is not a map of strings", preview(raw))
		}
		out := make(map[string]string, len(obj))
		var warns []string
		for k, v := range obj {
			var s string
			if err := json.Unmarshal(v, &s); err == nil {
				out[k] = s
				continue
			}
			// YAML turns `KEY: true` into a JSON boolean; Istio rejects it.
			// Keep the text and say so instead of failing the pod.
			var scalar any
			if err := json.Unmarshal(v, &scalar); err != nil {
				return nil, fmt.Errorf("key %q: %s is not a string", k, preview(v))
			}
			switch scalar.(type) {
			case bool, float64:
				out[k] = string(compact(v))
				warns = append(warns, fmt.Sprintf("key %q: %s is not a string, used as %q (quote it)", k, preview(v), out[k]))
			default:
				return nil, fmt.Errorf("key %q: %s is not a string", k, preview(v))
			}
		}
		sort.Strings(warns)
		set(p, out)
		return warns, nil
	}
}

func strList(set func(*ProxyConfig, []string)) parseFunc {
	return func(p *ProxyConfig, raw json.RawMessage) ([]string, error) {
		var l []string
		if err := json.Unmarshal(raw, &l); err != nil {
			return nil, fmt.Errorf("%s is not a list of strings", preview(raw))
		}
		set(p, l)
		return nil, nil
	}
}

func rawJSON(set func(*ProxyConfig, json.RawMessage)) parseFunc {
	return func(p *ProxyConfig, raw json.RawMessage) ([]string, error) {
		set(p, compact(raw))
		return nil, nil
	}
}

func statsMatcher(p *ProxyConfig, raw json.RawMessage) ([]string, error) {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil, fmt.Errorf("%s is not an object with inclusionPrefixes, inclusionSuffixes, inclusionRegexps", preview(raw))
	}
	m := &StatsMatcher{}
	var warns []string
	for k, v := range obj {
		var dst *[]string
		switch canonicalName(k) {
		case "inclusionPrefixes":
			dst = &m.InclusionPrefixes
		case "inclusionSuffixes":
			dst = &m.InclusionSuffixes
		case "inclusionRegexps":
			dst = &m.InclusionRegexps
		default:
			warns = append(warns, fmt.Sprintf("unknown field %q, ignored", k))
			continue
		}
		if isNull(v) {
			continue
		}
		if err := json.Unmarshal(v, dst); err != nil {
			return nil, fmt.Errorf("%s: %s is not a list of strings", k, preview(v))
		}
	}
	for _, re := range m.InclusionRegexps {
		if _, err := regexp.Compile(re); err != nil {
			return nil, fmt.Errorf("inclusionRegexps: %q is not a regular expression: %v", re, err)
		}
	}
	sort.Strings(warns)
	p.ProxyStatsMatcher = m
	return warns, nil
}

func isNull(raw json.RawMessage) bool {
	return string(bytes.TrimSpace(raw)) == "null"
}

func compact(raw json.RawMessage) json.RawMessage {
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return append(json.RawMessage(nil), raw...)
	}
	return b.Bytes()
}

// preview quotes a JSON value for an error message, shortened.
func preview(raw []byte) string {
	s := string(bytes.TrimSpace(raw))
	if len(s) > 60 {
		s = s[:57] + "..."
	}
	return s
}
