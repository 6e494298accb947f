package health

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Config is everything the status server needs. Start from DefaultConfig (or
// ConfigFromEnv) and override; zero values of the hook fields mean "not
// wired".
type Config struct {
	// StatusPort serves every endpoint on all addresses. Default 15020
	// (Istio: --statusPort). 0 picks a free port (tests).
	StatusPort uint16
	// ReadinessPort serves only GET /healthz/ready on all addresses. Default
	// 15021 (Istio: ENVOY_STATUS_PORT, where Istio runs an Envoy listener that
	// forwards to 15020; Outrigger answers it directly, so Envoy's bootstrap
	// must not bind it). 0 picks a free port (tests).
	ReadinessPort uint16
	// BindAddr is the address both ports listen on. Default the unspecified
	// address (kubelet probes the pod IP). Outrigger only; tests use
	// 127.0.0.1.
	BindAddr netip.Addr

	// Localhost is how the agent reaches Envoy and the application's metrics
	// inside the pod. Default 127.0.0.1, or ::1 when PodIP is IPv6 (as Istio).
	Localhost netip.Addr
	// EnvoyAdminPort is Envoy's admin port, read for readiness. Default 15000
	// (Istio: ProxyConfig.proxyAdminPort).
	EnvoyAdminPort uint16
	// EnvoyPrometheusPort is Envoy's Prometheus listener, merged into
	// /stats/prometheus. Default 15090 (Istio: ENVOY_PROMETHEUS_PORT).
	EnvoyPrometheusPort uint16
	// EnvoyDisabled skips the Envoy readiness check and Envoy metrics.
	// Default false (Istio: DISABLE_ENVOY).
	EnvoyDisabled bool

	// PodIP is where app probes are sent. Istio: INSTANCE_IP. When invalid
	// (unset), probes go to Localhost.
	PodIP netip.Addr
	// ProbeLocalhost sends app probes to Localhost instead of PodIP. Default
	// false (Istio: REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION).
	ProbeLocalhost bool
	// ProbeSourceV4 and ProbeSourceV6 are the source addresses of app probes,
	// which Istio's iptables rules let past Envoy. Defaults 127.0.0.6 and ::6
	// (as Istio).
	ProbeSourceV4, ProbeSourceV6 netip.Addr
	// AppProbers are the rewritten kubelet probes by path (Istio:
	// ISTIO_KUBE_APP_PROBERS, parsed with ParseAppProbers).
	AppProbers AppProbes
	// ProbeKeepAlive reuses connections between app probes. Default false
	// (Istio: ENABLE_PROBE_KEEPALIVE_CONNECTIONS).
	ProbeKeepAlive bool
	// ProbeHTTP2 allows HTTP/2 for HTTPS app probes. Default true (Istio:
	// ISTIO_ENABLE_HTTP2_PROBING).
	ProbeHTTP2 bool

	// AppMetrics are the application's metrics endpoints merged into
	// /stats/prometheus (Istio: ISTIO_PROMETHEUS_ANNOTATIONS, parsed with
	// ParsePrometheusAnnotations). Empty means none.
	AppMetrics []ScrapeTarget
	// MergeEnvoyStats includes Envoy's metrics in /stats/prometheus. Default
	// true (Istio: PILOT_AGENT_MERGE_ENVOY_STATS).
	MergeEnvoyStats bool
	// MetricsLocalhostOnly answers /stats/prometheus only to loopback
	// clients (403 otherwise). Default false (Istio:
	// METRICS_LOCALHOST_ACCESS_ONLY).
	MetricsLocalhostOnly bool
	// ScrapeTimeout bounds each source of a merged scrape. Prometheus'
	// X-Prometheus-Scrape-Timeout-Seconds lowers it. Default 5s. Outrigger
	// only.
	ScrapeTimeout time.Duration
	// ScrapeMaxBytes caps each source's body; a larger body drops that
	// source. Default 10 MiB (as Istio).
	ScrapeMaxBytes int64
	// Registry holds the agent's own metrics; the server registers its
	// metrics and the build-info, process and Go collectors into it, and
	// other parts of the agent register theirs. Nil makes a fresh one
	// (Server.Registry returns it). Outrigger only.
	Registry *prometheus.Registry
	// Version is reported in outrigger_build_info.
	Version string

	// Profiling serves /debug/pprof/ to loopback clients. Default true
	// (Istio: --profiling).
	Profiling bool

	// ReadinessCacheTTL is how long a not-ready answer from Envoy's admin is
	// reused, so a probe storm never hammers Envoy. Default 250ms.
	// Outrigger only.
	ReadinessCacheTTL time.Duration
	// AdminTimeout bounds one readiness query to Envoy's admin. Default 1s
	// (Istio: the config-status query's timeout).
	AdminTimeout time.Duration
	// NotReadyLogInterval rate-limits the "not ready" log line while the
	// reason does not change. Default 10s. Outrigger only.
	NotReadyLogInterval time.Duration
	// ShutdownTimeout bounds the graceful close of both listeners once Run's
	// context ends. Default 2s. Outrigger only.
	ShutdownTimeout time.Duration
	// StartTime is when the agent started, for
	// outrigger_startup_duration_seconds. Default: when New ran.
	StartTime time.Time

	// DNSReady reports whether the DNS proxy has its name table (Istio's
	// "DNS lookup table is not ready yet"). Nil means DNS is not required.
	// It is called on every readiness request: it must not block.
	DNSReady func() bool
	// OnQuit is called after POST /quitquitquit has been answered: stop the
	// agent now, skipping the drain (for Jobs). Nil answers 501.
	OnQuit func()
	// OnDrain is called after POST /drain has been answered: start draining
	// Envoy now (native-sidecar preStop). Nil answers 501.
	OnDrain func()
	// NameTable returns the DNS name table for /debug/ndsz, encoded as JSON;
	// nil (the func or its result) answers 404 "{}" as Istio does.
	NameTable func() any
}

// DefaultConfig returns the defaults, as Istio's agent has them.
func DefaultConfig() Config {
	return Config{
		StatusPort:          15020,
		ReadinessPort:       15021,
		BindAddr:            netip.IPv6Unspecified(),
		Localhost:           netip.AddrFrom4([4]byte{127, 0, 0, 1}),
		EnvoyAdminPort:      15000,
		EnvoyPrometheusPort: 15090,
		ProbeSourceV4:       netip.AddrFrom4([4]byte{127, 0, 0, 6}),
		ProbeSourceV6:       netip.MustParseAddr("::6"),
		ProbeHTTP2:          true,
		MergeEnvoyStats:     true,
		ScrapeTimeout:       5 * time.Second,
		ScrapeMaxBytes:      10 << 20,
		Profiling:           true,
		ReadinessCacheTTL:   250 * time.Millisecond,
		AdminTimeout:        time.Second,
		NotReadyLogInterval: 10 * time.Second,
		ShutdownTimeout:     2 * time.Second,
	}
}

// ConfigFromEnv returns DefaultConfig with the Istio environment variables
// the status server reads applied. lookup is os.LookupEnv in the agent. Each
// error names the variable and what to fix.
func ConfigFromEnv(lookup func(string) (string, bool)) (Config, error) {
	cfg := DefaultConfig()
	get := func(k string) string { v, _ := lookup(k); return strings.TrimSpace(v) }

	if v := get("INSTANCE_IP"); v != "" {
		ip, err := netip.ParseAddr(v)
		if err != nil {
			return cfg, fmt.Errorf("INSTANCE_IP: %q is not an IP address (the downward API sets it to status.podIP)", v)
		}
		cfg.PodIP = ip.Unmap()
		if cfg.PodIP.Is6() {
			cfg.Localhost = netip.IPv6Loopback()
		}
	}
	var err error
	if cfg.AppProbers, err = ParseAppProbers(get("ISTIO_KUBE_APP_PROBERS")); err != nil {
		return cfg, err
	}
	if cfg.AppMetrics, err = ParsePrometheusAnnotations(get("ISTIO_PROMETHEUS_ANNOTATIONS")); err != nil {
		return cfg, err
	}
	if v := get("ENVOY_PROMETHEUS_PORT"); v != "" {
		if cfg.EnvoyPrometheusPort, err = parsePort(v); err != nil {
			return cfg, fmt.Errorf("ENVOY_PROMETHEUS_PORT: %w", err)
		}
	}
	if v := get("ENVOY_STATUS_PORT"); v != "" {
		if cfg.ReadinessPort, err = parsePort(v); err != nil {
			return cfg, fmt.Errorf("ENVOY_STATUS_PORT: %w", err)
		}
	}
	bools := []struct {
		env string
		dst *bool
	}{
		{"PILOT_AGENT_MERGE_ENVOY_STATS", &cfg.MergeEnvoyStats},
		{"METRICS_LOCALHOST_ACCESS_ONLY", &cfg.MetricsLocalhostOnly},
		{"REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION", &cfg.ProbeLocalhost},
		{"ENABLE_PROBE_KEEPALIVE_CONNECTIONS", &cfg.ProbeKeepAlive},
		{"ISTIO_ENABLE_HTTP2_PROBING", &cfg.ProbeHTTP2},
		{"DISABLE_ENVOY", &cfg.EnvoyDisabled},
	}
	for _, b := range bools {
		v := get(b.env)
		if v == "" {
			continue
		}
		parsed, err := strconv.ParseBool(v)
		if err != nil {
			return cfg, fmt.Errorf("%s: %q is not a boolean (use true or false)", b.env, v)
		}
		*b.dst = parsed
	}
	return cfg, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not a port number (1-65535)", s)
	}
	return uint16(n), nil
}

// reservedPorts are the pod's agent and Envoy ports; an application metrics
// target on one of them would scrape the mesh itself (as Istio refuses).
var reservedPorts = map[uint16]string{
	15000: "Envoy admin",
	15001: "outbound capture",
	15004: "istiod debug",
	15006: "inbound capture",
	15008: "HBONE",
	15020: "status server",
	15021: "readiness",
	15053: "DNS proxy",
	15090: "Envoy Prometheus",
}

// validate fills the defaults a caller may have left zero and rejects
// combinations that cannot work.
func (c *Config) validate() error {
	d := DefaultConfig()
	if !c.BindAddr.IsValid() {
		c.BindAddr = d.BindAddr
	}
	if !c.Localhost.IsValid() {
		c.Localhost = d.Localhost
	}
	if !c.ProbeSourceV4.IsValid() {
		c.ProbeSourceV4 = d.ProbeSourceV4
	}
	if !c.ProbeSourceV6.IsValid() {
		c.ProbeSourceV6 = d.ProbeSourceV6
	}
	for _, dur := range []struct {
		v *time.Duration
		d time.Duration
	}{
		{&c.ScrapeTimeout, d.ScrapeTimeout},
		{&c.ReadinessCacheTTL, d.ReadinessCacheTTL},
		{&c.AdminTimeout, d.AdminTimeout},
		{&c.NotReadyLogInterval, d.NotReadyLogInterval},
		{&c.ShutdownTimeout, d.ShutdownTimeout},
	} {
		if *dur.v <= 0 {
			*dur.v = dur.d
		}
	}
	if c.ScrapeMaxBytes <= 0 {
		c.ScrapeMaxBytes = d.ScrapeMaxBytes
	}
	if c.StatusPort != 0 && c.StatusPort == c.ReadinessPort {
		return fmt.Errorf("status port and readiness port are both %d: give ENVOY_STATUS_PORT a different port", c.StatusPort)
	}
	for _, t := range c.AppMetrics {
		if t.Port == c.StatusPort || t.Port == c.ReadinessPort {
			return fmt.Errorf("ISTIO_PROMETHEUS_ANNOTATIONS: port %d is the agent's own status port; point prometheus.io/port at the application", t.Port)
		}
		if why, ok := reservedPorts[t.Port]; ok {
			return fmt.Errorf("ISTIO_PROMETHEUS_ANNOTATIONS: port %d is reserved for the %s; point prometheus.io/port at the application", t.Port, why)
		}
	}
	return nil
}
