package health

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metric sources, the values of the source label.
const (
	sourceAgent = "agent"
	sourceEnvoy = "envoy"
	sourceApp   = "application"
)

// metrics are the status server's own metrics. Istio's names are
// istio_agent_<name>; Outrigger's are outrigger_<name> (docs/status-server.md
// maps them).
type metrics struct {
	startup        prometheus.Gauge
	scrapes        prometheus.Counter
	scrapeFailures *prometheus.CounterVec
	mergeDropped   *prometheus.CounterVec
	appProbes      *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, version string, ready func() bool) (*metrics, error) {
	m := &metrics{
		startup: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "outrigger_startup_duration_seconds",
			Help: "Seconds from agent start to the first time the proxy was ready.",
		}),
		scrapes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outrigger_scrapes_total",
			Help: "Requests to the merged metrics endpoint.",
		}),
		scrapeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outrigger_metrics_scrape_failures_total",
			Help: "Merged scrapes in which one source (agent, envoy, application) failed, timed out or was too large and was left out.",
		}, []string{"source"}),
		mergeDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outrigger_metrics_merge_dropped_families_total",
			Help: "Metric families left out of a merged scrape because an earlier source already had the name with another type.",
		}, []string{"source"}),
		appProbes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outrigger_app_probes_total",
			Help: "Application probes run for kubelet, by kind and result.",
		}, []string{"kind", "result"}),
	}
	for _, s := range []string{sourceAgent, sourceEnvoy, sourceApp} {
		m.scrapeFailures.WithLabelValues(s)
	}
	buildInfo := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "outrigger_build_info",
		Help:        "Always 1; labels give the agent's version.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	})
	buildInfo.Set(1)
	cs := []prometheus.Collector{
		buildInfo,
		m.startup, m.scrapes, m.scrapeFailures, m.mergeDropped, m.appProbes,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "outrigger_ready",
			Help: "1 when the last readiness check passed, else 0.",
		}, func() float64 {
			if ready() {
				return 1
			}
			return 0
		}),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewGoCollector(),
	}
	for _, c := range cs {
		// The lead may have registered the process and Go collectors already.
		if err := reg.Register(c); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
			return nil, fmt.Errorf("register agent metrics: %w", err)
		}
	}
	return m, nil
}
