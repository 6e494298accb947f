package health

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestConfigFromEnv(t *testing.T) {
	env := map[string]string{
		"INSTANCE_IP":                   "fd00:10::2",
		"ISTIO_KUBE_APP_PROBERS":        `{"/app-health/app/readyz":{"tcpSocket":{"port":8080}}}`,
		"ISTIO_PROMETHEUS_ANNOTATIONS":  `{"scrape":"true","port":"9100"}`,
		"PILOT_AGENT_MERGE_ENVOY_STATS": "false",
		"METRICS_LOCALHOST_ACCESS_ONLY": "true",
		"ENVOY_PROMETHEUS_PORT":         "15091",
		"ENVOY_STATUS_PORT":             "15022",
		"ISTIO_ENABLE_HTTP2_PROBING":    "false",
	}
	cfg, err := ConfigFromEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err != nil {
		t.Fatal(err)
	}
	got := struct {
		PodIP, Localhost               netip.Addr
		MergeEnvoy, LocalOnly, HTTP2   bool
		PromPort, ReadyPort, StatusPrt uint16
		Metrics                        []ScrapeTarget
		Probes                         int
	}{cfg.PodIP, cfg.Localhost, cfg.MergeEnvoyStats, cfg.MetricsLocalhostOnly, cfg.ProbeHTTP2,
		cfg.EnvoyPrometheusPort, cfg.ReadinessPort, cfg.StatusPort, cfg.AppMetrics, len(cfg.AppProbers)}
	want := got
	want.PodIP, want.Localhost = netip.MustParseAddr("fd00:10::2"), netip.IPv6Loopback()
	want.MergeEnvoy, want.LocalOnly, want.HTTP2 = false, true, false
	want.PromPort, want.ReadyPort, want.StatusPrt = 15091, 15022, 15020
	want.Metrics = []ScrapeTarget{{Port: 9100, Path: "/metrics"}}
	want.Probes = 1
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("config (-want +got):\n%s", diff)
	}
}

func TestConfigFromEnvErrors(t *testing.T) {
	tests := []struct{ env, val, want string }{
		{"INSTANCE_IP", "pod", "INSTANCE_IP"},
		{"PILOT_AGENT_MERGE_ENVOY_STATS", "yes please", "PILOT_AGENT_MERGE_ENVOY_STATS"},
		{"ENVOY_PROMETHEUS_PORT", "99999", "ENVOY_PROMETHEUS_PORT"},
		{"ISTIO_PROMETHEUS_ANNOTATIONS", `{"port":"http"}`, "ISTIO_PROMETHEUS_ANNOTATIONS: port"},
		{"ISTIO_KUBE_APP_PROBERS", `[]`, "ISTIO_KUBE_APP_PROBERS"},
	}
	for _, tc := range tests {
		_, err := ConfigFromEnv(func(k string) (string, bool) {
			if k == tc.env {
				return tc.val, true
			}
			return "", false
		})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s=%q: error %v, want it to name %s", tc.env, tc.val, err, tc.want)
		}
	}
}

func TestParsePrometheusAnnotations(t *testing.T) {
	tests := []struct {
		in   string
		want []ScrapeTarget
	}{
		{"", nil},
		{`{"scrape":"false","port":"8080"}`, nil},
		{`{"scrape":"true"}`, []ScrapeTarget{{Port: 80, Path: "/metrics"}}},
		{`{"scrape":"true","port":"8080","path":"stats"}`, []ScrapeTarget{{Port: 8080, Path: "/stats"}}},
		{`{"scrape":"true","targets":[{"port":"9000"},{"port":"9001","path":"/m"}]}`,
			[]ScrapeTarget{{Port: 9000, Path: "/metrics"}, {Port: 9001, Path: "/m"}}},
	}
	for _, tc := range tests {
		got, err := ParsePrometheusAnnotations(tc.in)
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s", tc.in, diff)
		}
	}
}

func TestNewRejects(t *testing.T) {
	tests := []struct {
		name  string
		tweak func(*Config)
		want  string
	}{
		{"metrics on Envoy admin", func(c *Config) { c.AppMetrics = []ScrapeTarget{{Port: 15000}} }, "reserved for the Envoy admin"},
		{"metrics on status port", func(c *Config) { c.StatusPort = 9000; c.AppMetrics = []ScrapeTarget{{Port: 9000}} }, "agent's own status port"},
		{"same ports", func(c *Config) { c.StatusPort, c.ReadinessPort = 9000, 9000 }, "both 9000"},
	}
	for _, tc := range tests {
		cfg := DefaultConfig()
		tc.tweak(&cfg)
		if _, err := New(cfg, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
		}
	}
}
