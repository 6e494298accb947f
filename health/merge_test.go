package health

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
)

const envoyText = `# TYPE envoy_cluster_upstream_cx_total counter
envoy_cluster_upstream_cx_total{cluster_name="xds-grpc"} 3
# TYPE envoy_server_live gauge
envoy_server_live 1
# TYPE shared_metric gauge
shared_metric{from="envoy"} 1
# TYPE conflict_metric gauge
conflict_metric 1
`

const appOpenMetrics = `# TYPE app_requests counter
# HELP app_requests Requests served.
app_requests_total{code="200"} 42
# TYPE shared_metric gauge
shared_metric{from="app"} 2
shared_metric{from="envoy"} 99
# TYPE conflict_metric counter
conflict_metric_total 5
# EOF
`

const appText = `# TYPE app_requests_total counter
app_requests_total{code="200"} 42
# TYPE shared_metric gauge
shared_metric{from="app"} 2
shared_metric{from="envoy"} 99
# TYPE conflict_metric counter
conflict_metric 5
`

// metricsSource serves a fixed body, optionally slowly or failing.
type metricsSource struct {
	delay      time.Duration
	status     int
	openMetric bool // answers OpenMetrics when the Accept header allows
	body       func(om bool) string
	accepts    atomic.Pointer[string]
}

func (m *metricsSource) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a := r.Header.Get("Accept")
	m.accepts.Store(&a)
	if m.delay > 0 {
		select {
		case <-time.After(m.delay):
		case <-r.Context().Done():
			return
		}
	}
	if m.status != 0 {
		w.WriteHeader(m.status)
		return
	}
	om := m.openMetric && strings.Contains(a, "application/openmetrics-text")
	if om {
		w.Header().Set("Content-Type", string(expfmt.FmtOpenMetrics_1_0_0))
	} else {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	}
	_, _ = io.WriteString(w, m.body(om))
}

func envoySource() *metricsSource {
	return &metricsSource{body: func(bool) string { return envoyText }}
}

func appSource() *metricsSource {
	return &metricsSource{openMetric: true, body: func(om bool) string {
		if om {
			return appOpenMetrics
		}
		return appText
	}}
}

// mergeServer starts a server merging the agent registry (with one custom
// metric), envoy and app.
func mergeServer(t *testing.T, envoy, app *metricsSource, tweak func(*Config)) *Server {
	t.Helper()
	cfg := testConfig(nil)
	cfg.EnvoyDisabled = false
	cfg.EnvoyAdminPort = 1 // readiness is not under test here
	if envoy != nil {
		cfg.MergeEnvoyStats = true
		cfg.EnvoyPrometheusPort = serve(t, envoy).Port()
	}
	if app != nil {
		cfg.AppMetrics = []ScrapeTarget{{Port: serve(t, app).Port(), Path: "/metrics"}}
	}
	reg := prometheus.NewRegistry()
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "agent_custom", Help: "Registered by another part."})
	g.Set(7)
	reg.MustRegister(g)
	cfg.Registry = reg
	if tweak != nil {
		tweak(&cfg)
	}
	return start(t, cfg)
}

type scrapeResult struct {
	contentType string
	body        string
	fams        map[string]*dto.MetricFamily
}

func scrape(t *testing.T, s *Server, accept string) scrapeResult {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+s.StatusAddr().String()+"/stats/prometheus", nil)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("scrape: status %d", resp.StatusCode)
	}
	if !resp.Uncompressed {
		t.Errorf("scrape was not gzip-compressed though the client accepts gzip")
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	res := scrapeResult{contentType: resp.Header.Get("Content-Type"), body: string(b), fams: map[string]*dto.MetricFamily{}}
	// The merged output must parse in its own format with no repeated family.
	dec := expfmt.NewDecoder(bytes.NewReader(b), expfmt.ResponseFormat(resp.Header))
	for {
		mf := &dto.MetricFamily{}
		if err := dec.Decode(mf); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			t.Fatalf("merged output does not parse: %v\n%s", err, b)
		}
		if _, dup := res.fams[mf.GetName()]; dup {
			t.Fatalf("family %s appears twice", mf.GetName())
		}
		res.fams[mf.GetName()] = mf
	}
	return res
}

func failures(t *testing.T, s *Server, source string) float64 {
	t.Helper()
	fams, err := s.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != "outrigger_metrics_scrape_failures_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "source" && l.GetValue() == source {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

func TestMergedMetricsFormats(t *testing.T) {
	tests := []struct {
		name, accept string
		wantType     string
		wantEOF      int
	}{
		{"prometheus text", "text/plain;version=0.0.4;q=1,*/*;q=0.1", "text/plain", 0},
		{"no accept header", "", "text/plain", 0},
		{"openmetrics", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5", "application/openmetrics-text", 1},
		{"protobuf is not offered", "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited", "text/plain", 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			envoy, app := envoySource(), appSource()
			s := mergeServer(t, envoy, app, nil)
			res := scrape(t, s, tc.accept)
			if !strings.HasPrefix(res.contentType, tc.wantType) {
				t.Errorf("Content-Type %q, want %s", res.contentType, tc.wantType)
			}
			if n := strings.Count(res.body, "# EOF"); n != tc.wantEOF {
				t.Errorf("%d '# EOF' lines, want %d", n, tc.wantEOF)
			}
			if tc.wantEOF == 1 && !strings.HasSuffix(res.body, "# EOF\n") {
				t.Errorf("'# EOF' is not the last line")
			}
			for _, name := range []string{"agent_custom", "outrigger_build_info", "outrigger_ready", "go_goroutines",
				"process_start_time_seconds", "envoy_server_live", "app_requests_total", "shared_metric", "conflict_metric"} {
				if res.fams[name] == nil {
					t.Errorf("family %s missing from the merged scrape", name)
				}
			}
			if ua := *app.accepts.Load(); strings.Contains(tc.accept, "openmetrics") != strings.Contains(ua, "openmetrics") {
				t.Errorf("app was asked for %q", ua)
			}
			if ea := *envoy.accepts.Load(); strings.Contains(ea, "openmetrics") {
				t.Errorf("Envoy was asked for OpenMetrics: %q", ea)
			}
			// shared_metric: Envoy's series first, the app's new series
			// added, the app's duplicate of Envoy's series left out.
			if got := seriesOf(res.fams["shared_metric"]); got != `from=app:2 from=envoy:1` {
				t.Errorf("shared_metric series %s", got)
			}
			// conflict_metric: Envoy's gauge wins, the app's counter is dropped.
			if res.fams["conflict_metric"].GetType() != dto.MetricType_GAUGE {
				t.Errorf("conflict_metric is %v, want Envoy's gauge", res.fams["conflict_metric"].GetType())
			}
		})
	}
}

// seriesOf renders a gauge family's series sorted by label, for comparison.
func seriesOf(mf *dto.MetricFamily) string {
	var parts []string
	for _, m := range mf.GetMetric() {
		var ls []string
		for _, l := range m.GetLabel() {
			ls = append(ls, l.GetName()+"="+l.GetValue())
		}
		parts = append(parts, strings.Join(ls, ",")+":"+strconv.FormatFloat(m.GetGauge().GetValue(), 'g', -1, 64))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

func TestMergedMetricsFailingSources(t *testing.T) {
	tests := []struct {
		name        string
		envoy, app  *metricsSource
		tweak       func(*Config)
		wantMissing []string
		wantPresent []string
		failed      string
	}{
		{
			name:        "slow app",
			envoy:       envoySource(),
			app:         &metricsSource{delay: 10 * time.Second, body: func(bool) string { return appText }},
			tweak:       func(c *Config) { c.ScrapeTimeout = 300 * time.Millisecond },
			wantMissing: []string{"app_requests_total"}, wantPresent: []string{"envoy_server_live", "agent_custom"},
			failed: sourceApp,
		},
		{
			name:        "failing envoy",
			envoy:       &metricsSource{status: 500},
			app:         appSource(),
			wantMissing: []string{"envoy_server_live"}, wantPresent: []string{"app_requests_total", "agent_custom"},
			failed: sourceEnvoy,
		},
		{
			name:        "oversized envoy",
			envoy:       &metricsSource{body: func(bool) string { return envoyText + strings.Repeat("# padding\n", 200) }},
			app:         appSource(),
			tweak:       func(c *Config) { c.ScrapeMaxBytes = 512 },
			wantMissing: []string{"envoy_server_live"}, wantPresent: []string{"app_requests_total", "agent_custom"},
			failed: sourceEnvoy,
		},
		{
			name:        "app speaks garbage",
			envoy:       envoySource(),
			app:         &metricsSource{body: func(bool) string { return "this is { not metrics\n" }},
			wantMissing: []string{"app_requests_total"}, wantPresent: []string{"envoy_server_live", "agent_custom"},
			failed: sourceApp,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := mergeServer(t, tc.envoy, tc.app, tc.tweak)
			res := scrape(t, s, "")
			for _, n := range tc.wantMissing {
				if res.fams[n] != nil {
					t.Errorf("%s present, want it left out", n)
				}
			}
			for _, n := range tc.wantPresent {
				if res.fams[n] == nil {
					t.Errorf("%s missing", n)
				}
			}
			if got := failures(t, s, tc.failed); got != 1 {
				t.Errorf("failures{source=%s} = %v, want 1", tc.failed, got)
			}
		})
	}
}

// Prometheus' own timeout header lowers the per-source timeout.
func TestMergedMetricsScrapeTimeoutHeader(t *testing.T) {
	app := &metricsSource{delay: 10 * time.Second, body: func(bool) string { return appText }}
	s := mergeServer(t, nil, app, nil) // default ScrapeTimeout 5s
	req, _ := http.NewRequest(http.MethodGet, "http://"+s.StatusAddr().String()+"/stats/prometheus", nil)
	req.Header.Set("X-Prometheus-Scrape-Timeout-Seconds", "0.3")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got := failures(t, s, sourceApp); got != 1 {
		t.Errorf("failures{source=application} = %v, want 1", got)
	}
}

func TestMergeEnvoyStatsOff(t *testing.T) {
	envoy := envoySource()
	s := mergeServer(t, envoy, nil, func(c *Config) { c.MergeEnvoyStats = false })
	res := scrape(t, s, "")
	if res.fams["envoy_server_live"] != nil || envoy.accepts.Load() != nil {
		t.Errorf("Envoy scraped with PILOT_AGENT_MERGE_ENVOY_STATS=false")
	}
	if res.fams["agent_custom"] == nil {
		t.Errorf("agent metrics missing")
	}
}

// Whatever two sources send, the merged output parses in the negotiated
// format and names no family twice.
func FuzzMerge(f *testing.F) {
	f.Add(envoyText, appText, false)
	f.Add(envoyText, appOpenMetrics, true)
	f.Add("# TYPE x histogram\nx_bucket{le=\"1\"} 1\nx_bucket{le=\"+Inf\"} 2\nx_sum 3\nx_count 2\n", "x_sum 1\n", true)
	f.Fuzz(func(t *testing.T, a, b string, om bool) {
		m := newMerger()
		for _, src := range []string{a, b} {
			fams, err := decodeFamilies([]byte(src), expfmt.FmtText)
			if err != nil {
				continue
			}
			m.add(fams)
		}
		format := expfmt.FmtText
		if om {
			format = expfmt.FmtOpenMetrics_1_0_0
		}
		var out bytes.Buffer
		if err := m.write(&out, format); err != nil {
			t.Fatal(err)
		}
		if om && strings.Count(out.String(), "# EOF") != 1 {
			t.Fatalf("%d # EOF in %q", strings.Count(out.String(), "# EOF"), out.String())
		}
		if _, err := decodeFamilies(out.Bytes(), format); err != nil {
			t.Fatalf("merged output does not parse: %v\n%s", err, out.String())
		}
	})
}
