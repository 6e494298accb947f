package dnsproxy

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Query results, the "result" label of dns_queries_total.
const (
	resultTable    = iota // answered from the name table (NODATA included)
	resultCache           // answered from the cache
	resultStale           // answered stale: every upstream failed
	resultUpstream        // relayed from an upstream
	resultServfail        // SERVFAIL: no table yet, or no upstream answered
	resultFormerr         // malformed request: FORMERR, NOTIMP or BADVERS
	resultDropped         // no answer at all (too short, or a response)
	numResults
)

var resultNames = [numResults]string{"table", "cache", "stale", "upstream", "servfail", "formerr", "dropped"}

// Query types with their own label value; the rest count as "other".
var typeNames = []struct {
	qtype uint16
	name  string
}{{1, "A"}, {28, "AAAA"}, {5, "CNAME"}, {12, "PTR"}, {33, "SRV"}, {16, "TXT"}, {15, "MX"}, {65, "HTTPS"}, {6, "SOA"}, {2, "NS"}}

const typeOther = 10 // index of "other", after typeNames

// metrics are the DNS proxy's series. The first four keep Istio's names (the
// status server adds the istio_agent_ prefix); the rest are Outrigger's.
type metrics struct {
	requests         prometheus.Counter
	upstreamRequests prometheus.Counter
	upstreamFailures prometheus.Counter
	upstreamDuration prometheus.Histogram

	queries     [typeOther + 1][numResults]prometheus.Counter
	cacheHits   prometheus.Counter
	cacheMisses prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, cacheLen func() int) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dns_requests_total", Help: "Total number of DNS requests.",
		}),
		upstreamRequests: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dns_upstream_requests_total", Help: "Total number of DNS requests forwarded to upstream resolvers.",
		}),
		upstreamFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dns_upstream_failures_total", Help: "Total number of forwarded DNS requests no upstream resolver answered.",
		}),
		upstreamDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "dns_upstream_request_duration_seconds", Help: "Time to answer a forwarded DNS request.",
			Buckets: []float64{.001, .005, .01, .1, 1, 5},
		}),
		cacheHits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dns_cache_hits_total", Help: "Queries answered from the cache of upstream answers (fresh or stale).",
		}),
		cacheMisses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dns_cache_misses_total", Help: "Queries for names outside the name table not found fresh in the cache.",
		}),
	}
	queries := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "dns_queries_total", Help: "DNS queries by query type and how they were answered.",
	}, []string{"type", "result"})
	for ti := range m.queries {
		tn := "other"
		if ti < len(typeNames) {
			tn = typeNames[ti].name
		}
		for ri := range m.queries[ti] {
			m.queries[ti][ri] = queries.WithLabelValues(tn, resultNames[ri])
		}
	}
	cs := []prometheus.Collector{m.requests, m.upstreamRequests, m.upstreamFailures, m.upstreamDuration, queries, m.cacheHits, m.cacheMisses}
	if cacheLen != nil {
		cs = append(cs, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "dns_cache_entries", Help: "Entries in the cache of upstream answers, stale ones included.",
		}, func() float64 { return float64(cacheLen()) }))
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return nil, fmt.Errorf("dnsproxy: metrics already registered (one DNS proxy per registry): %w", err)
			}
			return nil, fmt.Errorf("dnsproxy: register metrics: %w", err)
		}
	}
	return m, nil
}

// count records one answered (or dropped) query.
func (m *metrics) count(qtype uint16, result int) {
	ti := typeOther
	for i := range typeNames {
		if typeNames[i].qtype == qtype {
			ti = i
			break
		}
	}
	m.queries[ti][result].Inc()
}
