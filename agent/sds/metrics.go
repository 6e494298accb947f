package sds

import (
	"errors"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the agent's identity metrics, named as Istio's agent exports
// them on :15020 (registry prefix istio_agent_ included here).
type metrics struct {
	csrRequests    prometheus.Counter
	csrFailures    prometheus.Counter
	csrLatencyMs   prometheus.Counter
	watchFailures  prometheus.Counter
	secretFailures prometheus.Counter
	nacks          prometheus.Counter

	mu     sync.Mutex
	expiry time.Time // of "default"; zero when none is served
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	csr := prometheus.Labels{"request_type": "csr"}
	m := &metrics{
		csrRequests: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "istio_agent_num_outgoing_requests", ConstLabels: csr,
			Help: "Number of requests sent to the CA.",
		}),
		csrFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "istio_agent_num_failed_outgoing_requests", ConstLabels: csr,
			Help: "Number of failed requests to the CA (unreachable, rejected, or an unusable certificate).",
		}),
		csrLatencyMs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "istio_agent_outgoing_latency", ConstLabels: csr,
			Help: "Total time spent in requests to the CA, in milliseconds.",
		}),
		watchFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "istio_agent_num_file_watcher_failures_total",
			Help: "Number of times a certificate file could not be watched.",
		}),
		secretFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "istio_agent_num_file_secret_failures_total",
			Help: "Number of times a certificate or key file could not be loaded or did not verify.",
		}),
		nacks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "istio_agent_sds_nacks_total",
			Help: "Number of SDS responses Envoy rejected (Outrigger only).",
		}),
	}
	if reg == nil {
		return m, nil
	}
	expiry := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "istio_agent_cert_expiry_seconds",
		ConstLabels: prometheus.Labels{"resource_name": WorkloadResource},
		Help:        "Seconds until the served workload certificate expires (0 when none is served).",
	}, m.secondsToExpiry)
	var errs []error
	for _, c := range []prometheus.Collector{m.csrRequests, m.csrFailures, m.csrLatencyMs, m.watchFailures, m.secretFailures, m.nacks, expiry} {
		errs = append(errs, reg.Register(c))
	}
	return m, errors.Join(errs...)
}

func (m *metrics) setExpiry(t time.Time) {
	m.mu.Lock()
	m.expiry = t
	m.mu.Unlock()
}

func (m *metrics) secondsToExpiry() float64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.expiry.IsZero() {
		return 0
	}
	return time.Until(m.expiry).Seconds()
}
