package health

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"go.uber.org/zap"
)

// The output formats a merged scrape offers, best first. Protobuf is not
// offered: Istio dropped it from merging after it broke scrapes.
var mergedFormats = []expfmt.Format{expfmt.FmtOpenMetrics_1_0_0, expfmt.FmtOpenMetrics_0_0_1, expfmt.FmtText}

// Accept headers sent to the sources. Envoy only speaks text; the
// application may speak OpenMetrics, which the merge can parse too.
const (
	acceptText        = `text/plain;version=0.0.4;q=1,*/*;q=0.1`
	acceptOpenMetrics = `application/openmetrics-text;version=1.0.0;q=0.9,application/openmetrics-text;version=0.0.1;q=0.8,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`
)

// scrapeSource is one remote source of a merged scrape.
type scrapeSource struct {
	kind   string // sourceEnvoy or sourceApp
	url    string
	accept string
}

// metricSources lists the remote sources in output priority order (Envoy,
// then the application targets), as Istio orders them.
func (s *Server) metricSources(r *http.Request, openMetrics bool) []scrapeSource {
	var out []scrapeSource
	if !s.cfg.EnvoyDisabled && s.cfg.MergeEnvoyStats {
		u := url.URL{Scheme: "http", Host: netip.AddrPortFrom(s.cfg.Localhost, s.cfg.EnvoyPrometheusPort).String(),
			Path: "/stats/prometheus", RawQuery: r.URL.RawQuery}
		out = append(out, scrapeSource{kind: sourceEnvoy, url: u.String(), accept: acceptText})
	}
	accept := acceptText
	if openMetrics {
		accept = acceptOpenMetrics
	}
	for _, t := range s.cfg.AppMetrics {
		u := url.URL{Scheme: "http", Host: netip.AddrPortFrom(s.cfg.Localhost, t.Port).String(), Path: t.Path}
		out = append(out, scrapeSource{kind: sourceApp, url: u.String(), accept: accept})
	}
	return out
}

// handleStats serves the merged scrape. It always answers 200: a source that
// fails is left out and counted, so the rest still reach Prometheus.
func (s *Server) handleStats(w http.ResponseWriter, r *http.Request) {
	if s.cfg.MetricsLocalhostOnly && !fromLoopback(r) {
		http.Error(w, "Only requests from localhost are allowed", http.StatusForbidden)
		return
	}
	s.metrics.scrapes.Inc()
	format := expfmt.NegotiateAccept(r.Header, mergedFormats...)
	openMetrics := format.FormatType() == expfmt.TypeOpenMetrics

	timeout := s.cfg.ScrapeTimeout
	if h := r.Header.Get("X-Prometheus-Scrape-Timeout-Seconds"); h != "" {
		// Leave Prometheus a tenth of its budget to receive our answer.
		if secs, err := strconv.ParseFloat(h, 64); err == nil && secs > 0 {
			if d := time.Duration(secs * 0.9 * float64(time.Second)); d < timeout {
				timeout = d
			}
		}
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()

	sources := s.metricSources(r, openMetrics)
	results := make([][]*dto.MetricFamily, len(sources))
	var wg sync.WaitGroup
	for i, src := range sources {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fams, err := s.scrape(ctx, src, r.Header)
			if err != nil {
				s.metrics.scrapeFailures.WithLabelValues(src.kind).Inc()
				s.log.Warn("metrics source left out of the merged scrape",
					zap.String("source", src.kind), zap.String("url", src.url), zap.Error(err))
				return
			}
			results[i] = fams
		}()
	}
	agent, err := s.registry.Gather()
	if err != nil {
		// Gather returns what it could; keep it.
		s.metrics.scrapeFailures.WithLabelValues(sourceAgent).Inc()
		s.log.Warn("agent metrics incomplete", zap.Error(err))
	}
	wg.Wait()

	m := newMerger()
	m.add(agent)
	for i, src := range sources {
		if n := m.add(results[i]); n > 0 {
			s.metrics.mergeDropped.WithLabelValues(src.kind).Add(float64(n))
		}
	}

	w.Header().Set("Content-Type", string(format))
	var out io.Writer = w
	if acceptsGzip(r) {
		w.Header().Set("Content-Encoding", "gzip")
		gz := gzip.NewWriter(w)
		defer gz.Close()
		out = gz
	}
	if err := m.write(out, format); err != nil {
		s.log.Debug("writing merged metrics", zap.Error(err))
	}
}

func acceptsGzip(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept-Encoding"), ",") {
		enc, _, _ := strings.Cut(strings.TrimSpace(part), ";")
		if strings.EqualFold(enc, "gzip") {
			return true
		}
	}
	return false
}

// scrape fetches and parses one source, within ctx and the size cap.
func (s *Server) scrape(ctx context.Context, src scrapeSource, in http.Header) ([]*dto.MetricFamily, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, src.url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", src.accept)
	for _, h := range []string{"User-Agent", "X-Prometheus-Scrape-Timeout-Seconds"} {
		if v := in.Get(h); v != "" {
			req.Header.Set(h, v)
		}
	}
	resp, err := s.scrapeClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, s.cfg.ScrapeMaxBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	if int64(len(body)) > s.cfg.ScrapeMaxBytes {
		return nil, fmt.Errorf("body larger than %d bytes", s.cfg.ScrapeMaxBytes)
	}
	format := expfmt.ResponseFormat(resp.Header)
	switch format.FormatType() {
	case expfmt.TypeOpenMetrics, expfmt.TypeTextPlain:
	case expfmt.TypeUnknown:
		format = expfmt.FmtText // Envoy and many exporters send bare text/plain
	default:
		return nil, fmt.Errorf("unsupported content type %q", resp.Header.Get("Content-Type"))
	}
	return decodeFamilies(body, format)
}

func decodeFamilies(body []byte, format expfmt.Format) ([]*dto.MetricFamily, error) {
	dec := expfmt.NewDecoder(bytes.NewReader(body), format)
	var out []*dto.MetricFamily
	for {
		mf := &dto.MetricFamily{}
		if err := dec.Decode(mf); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, fmt.Errorf("parse %s: %w", format, err)
		}
		out = append(out, mf)
	}
}

// merger joins metric families from several sources. The first source to
// name a family owns its name, type and HELP; later sources add series with
// label sets not seen yet, or are dropped when the name or type differs, so
// the output never announces a family twice (which Prometheus would reject).
type merger struct {
	fams map[string]*dto.MetricFamily
	// claimed maps every name a family writes (its metadata name and each
	// sample name, e.g. x_sum of histogram x) to the family's key, so a
	// family from a later source cannot write a line another family owns.
	claimed map[string]string
}

func newMerger() *merger {
	return &merger{fams: map[string]*dto.MetricFamily{}, claimed: map[string]string{}}
}

// add merges fams and returns how many families it had to drop.
func (m *merger) add(fams []*dto.MetricFamily) int {
	dropped := 0
	for _, mf := range fams {
		if len(mf.GetMetric()) == 0 {
			continue
		}
		key := familyKey(mf)
		have, ok := m.fams[key]
		if !ok {
			names := writtenNames(mf)
			if m.clash(key, names) {
				dropped++
				continue
			}
			for _, n := range names {
				m.claimed[n] = key
			}
			m.fams[key] = mf
			continue
		}
		if have.GetType() != mf.GetType() || have.GetName() != mf.GetName() {
			dropped++
			continue
		}
		seen := make(map[string]struct{}, len(have.Metric))
		for _, x := range have.Metric {
			seen[labelKey(x)] = struct{}{}
		}
		for _, x := range mf.Metric {
			if _, dup := seen[labelKey(x)]; !dup {
				have.Metric = append(have.Metric, x)
			}
		}
	}
	return dropped
}

func (m *merger) clash(key string, names []string) bool {
	for _, n := range names {
		if owner, ok := m.claimed[n]; ok && owner != key {
			return true
		}
	}
	return false
}

// writtenNames lists the names a family puts on the wire in either format.
func writtenNames(mf *dto.MetricFamily) []string {
	name, key := mf.GetName(), familyKey(mf)
	switch mf.GetType() {
	case dto.MetricType_COUNTER:
		return []string{key, name, key + "_total", key + "_created"}
	case dto.MetricType_SUMMARY:
		return []string{name, name + "_sum", name + "_count", name + "_created"}
	case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
		return []string{name, name + "_bucket", name + "_sum", name + "_count", name + "_created", name + "_gcount", name + "_gsum"}
	}
	return []string{name}
}

// familyKey is the name a family's metadata carries in OpenMetrics, where a
// counter foo_total is announced as foo: a gauge foo and a counter foo_total
// from two sources would otherwise both claim "# TYPE foo".
func familyKey(mf *dto.MetricFamily) string {
	if mf.GetType() == dto.MetricType_COUNTER {
		return strings.TrimSuffix(mf.GetName(), "_total")
	}
	return mf.GetName()
}

func labelKey(m *dto.Metric) string {
	ls := m.GetLabel()
	parts := make([]string, 0, len(ls))
	for _, l := range ls {
		parts = append(parts, l.GetName()+"\x00"+l.GetValue())
	}
	sort.Strings(parts)
	return strings.Join(parts, "\x01")
}

// write encodes the families in name order. Each family is encoded into a
// buffer first, so one that cannot be encoded is left out whole instead of
// corrupting the stream; OpenMetrics ends with exactly one "# EOF".
func (m *merger) write(w io.Writer, format expfmt.Format) error {
	names := make([]string, 0, len(m.fams))
	for n := range m.fams {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, format)
	for _, n := range names {
		buf.Reset()
		if err := enc.Encode(m.fams[n]); err != nil {
			continue
		}
		if _, err := w.Write(buf.Bytes()); err != nil {
			return err
		}
	}
	buf.Reset()
	if c, ok := enc.(expfmt.Closer); ok {
		if err := c.Close(); err != nil {
			return err
		}
	}
	_, err := w.Write(buf.Bytes())
	return err
}
