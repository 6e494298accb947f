package health

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// ProbeKind says how an app probe checks the application.
type ProbeKind int

// The probe kinds kubelet has and the injector rewrites.
const (
	ProbeHTTPGet ProbeKind = iota + 1
	ProbeTCPSocket
	ProbeGRPC
)

func (k ProbeKind) String() string {
	switch k {
	case ProbeHTTPGet:
		return "httpGet"
	case ProbeTCPSocket:
		return "tcpSocket"
	case ProbeGRPC:
		return "grpc"
	}
	return "unknown"
}

// AppProbe is one rewritten kubelet probe, typed.
type AppProbe struct {
	Kind ProbeKind
	// Port is the application's port.
	Port uint16
	// HTTPS is set for httpGet probes with scheme HTTPS.
	HTTPS bool
	// Path is the httpGet path, always starting with "/".
	Path string
	// Headers are the httpGet httpHeaders; kubelet also sends them to us, and
	// both are forwarded.
	Headers http.Header
	// Service is the grpc health service name ("" for the server as a whole).
	Service string
	// Timeout is the probe's timeoutSeconds (kubelet's default 1s when 0).
	Timeout time.Duration
}

// AppProbes maps a status-server path (/app-health/<container>/readyz) to its
// probe.
type AppProbes map[string]AppProbe

// appProbePath is the shape of the paths the injector writes (as Istio).
var appProbePath = regexp.MustCompile(`^/(app-health|app-lifecycle)/[^/]+/(livez|readyz|startupz|prestopz|poststartz)$`)

// kubeProbe mirrors the JSON the injector writes into ISTIO_KUBE_APP_PROBERS:
// a subset of the Kubernetes Probe type.
type kubeProbe struct {
	HTTPGet *struct {
		Path        string          `json:"path"`
		Port        json.RawMessage `json:"port"`
		Host        string          `json:"host"`
		Scheme      string          `json:"scheme"`
		HTTPHeaders []struct {
			Name  string `json:"name"`
			Value string `json:"value"`
		} `json:"httpHeaders"`
	} `json:"httpGet"`
	TCPSocket *struct {
		Port json.RawMessage `json:"port"`
		Host string          `json:"host"`
	} `json:"tcpSocket"`
	GRPC *struct {
		Port    json.RawMessage `json:"port"`
		Service *string         `json:"service"`
	} `json:"grpc"`
	TimeoutSeconds int32 `json:"timeoutSeconds"`
}

// ParseAppProbers parses ISTIO_KUBE_APP_PROBERS: a JSON object from status
// path to Kubernetes probe. Empty input means no probes. Errors name the
// variable and the probe path.
func ParseAppProbers(s string) (AppProbes, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var raw map[string]kubeProbe
	dec := json.NewDecoder(strings.NewReader(s))
	if err := dec.Decode(&raw); err != nil {
		return nil, fmt.Errorf("ISTIO_KUBE_APP_PROBERS: not a JSON object of path to probe: %w", err)
	}
	paths := make([]string, 0, len(raw))
	for p := range raw {
		paths = append(paths, p)
	}
	sort.Strings(paths) // the first error is the same on every run
	out := make(AppProbes, len(raw))
	for _, path := range paths {
		p, err := convertProbe(path, raw[path])
		if err != nil {
			return nil, fmt.Errorf("ISTIO_KUBE_APP_PROBERS: probe %q: %w", path, err)
		}
		out[path] = p
	}
	return out, nil
}

func convertProbe(path string, kp kubeProbe) (AppProbe, error) {
	if !appProbePath.MatchString(path) {
		return AppProbe{}, fmt.Errorf("path must look like /app-health/<container>/{livez,readyz,startupz}")
	}
	kinds := 0
	for _, set := range []bool{kp.HTTPGet != nil, kp.TCPSocket != nil, kp.GRPC != nil} {
		if set {
			kinds++
		}
	}
	if kinds != 1 {
		return AppProbe{}, fmt.Errorf("exactly one of httpGet, tcpSocket or grpc must be set, found %d", kinds)
	}
	if kp.TimeoutSeconds < 0 {
		return AppProbe{}, fmt.Errorf("timeoutSeconds is negative (%d)", kp.TimeoutSeconds)
	}
	p := AppProbe{Timeout: time.Duration(kp.TimeoutSeconds) * time.Second}
	if p.Timeout == 0 {
		p.Timeout = time.Second // kubelet's default
	}
	var err error
	switch {
	case kp.HTTPGet != nil:
		p.Kind = ProbeHTTPGet
		if p.Port, err = probePort(kp.HTTPGet.Port); err != nil {
			return AppProbe{}, fmt.Errorf("httpGet.port: %w", err)
		}
		switch strings.ToUpper(kp.HTTPGet.Scheme) {
		case "", "HTTP":
		case "HTTPS":
			p.HTTPS = true
		default:
			return AppProbe{}, fmt.Errorf("httpGet.scheme %q: want HTTP or HTTPS", kp.HTTPGet.Scheme)
		}
		p.Path = kp.HTTPGet.Path
		if !strings.HasPrefix(p.Path, "/") {
			p.Path = "/" + p.Path
		}
		for _, h := range kp.HTTPGet.HTTPHeaders {
			if p.Headers == nil {
				p.Headers = http.Header{}
			}
			p.Headers.Add(h.Name, h.Value)
		}
	case kp.TCPSocket != nil:
		p.Kind = ProbeTCPSocket
		if p.Port, err = probePort(kp.TCPSocket.Port); err != nil {
			return AppProbe{}, fmt.Errorf("tcpSocket.port: %w", err)
		}
	case kp.GRPC != nil:
		p.Kind = ProbeGRPC
		if p.Port, err = probePort(kp.GRPC.Port); err != nil {
			return AppProbe{}, fmt.Errorf("grpc.port: %w", err)
		}
		if kp.GRPC.Service != nil {
			p.Service = *kp.GRPC.Service
		}
	}
	return p, nil
}

// probePort accepts an integer port. Kubernetes allows named ports, but the
// agent cannot resolve a name to a container port, so (as Istio) it refuses.
func probePort(raw json.RawMessage) (uint16, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return 0, fmt.Errorf("missing")
	}
	if raw[0] == '"' {
		var name string
		_ = json.Unmarshal(raw, &name)
		return 0, fmt.Errorf("named port %q is not supported; use the container port number", name)
	}
	n, err := strconv.ParseUint(string(raw), 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%s is not a port number (1-65535)", raw)
	}
	return uint16(n), nil
}

// ScrapeTarget is one application metrics endpoint merged into
// /stats/prometheus.
type ScrapeTarget struct {
	Port uint16
	Path string
}

// ParsePrometheusAnnotations parses ISTIO_PROMETHEUS_ANNOTATIONS, the
// injector's copy of the pod's prometheus.io annotations:
// {"scrape":"true","path":"/metrics","port":"8080"} and optionally
// "targets":[{"port":"8080","path":"/metrics"}]. Empty input, or scrape
// "false", means no targets. Port defaults to 80 and path to /metrics (as
// Istio).
func ParsePrometheusAnnotations(s string) ([]ScrapeTarget, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	type target struct {
		Port string `json:"port"`
		Path string `json:"path"`
	}
	var cfg struct {
		Scrape  string   `json:"scrape"`
		Port    string   `json:"port"`
		Path    string   `json:"path"`
		Targets []target `json:"targets"`
	}
	if err := json.Unmarshal([]byte(s), &cfg); err != nil {
		return nil, fmt.Errorf("ISTIO_PROMETHEUS_ANNOTATIONS: not a JSON object with scrape, port and path strings: %w", err)
	}
	if strings.EqualFold(cfg.Scrape, "false") {
		return nil, nil
	}
	list := cfg.Targets
	if len(list) == 0 {
		list = []target{{Port: cfg.Port, Path: cfg.Path}}
	}
	out := make([]ScrapeTarget, 0, len(list))
	for _, t := range list {
		port := uint16(80)
		if t.Port != "" {
			p, err := parsePort(t.Port)
			if err != nil {
				return nil, fmt.Errorf("ISTIO_PROMETHEUS_ANNOTATIONS: port: %w; fix the prometheus.io/port annotation", err)
			}
			port = p
		}
		path := t.Path
		if path == "" {
			path = "/metrics"
		}
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		out = append(out, ScrapeTarget{Port: port, Path: path})
	}
	return out, nil
}
