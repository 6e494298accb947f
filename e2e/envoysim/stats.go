package main

import (
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"
	"sync"
)

// statKind is how a stat is exported to Prometheus.
type statKind int

const (
	counter statKind = iota
	gauge
)

type stat struct {
	kind  statKind
	value uint64
}

// stats is Envoy's stat store, reduced to what the agent reads. A stat
// exists ("used", in Envoy's terms) once written; /stats?usedonly lists only
// those, and the real Envoy omits the rest the same way.
type stats struct {
	mu sync.Mutex
	m  map[string]*stat
}

func newStats() *stats { return &stats{m: map[string]*stat{}} }

func (s *stats) get(name string, kind statKind) *stat {
	st, ok := s.m[name]
	if !ok {
		st = &stat{kind: kind}
		s.m[name] = st
	}
	return st
}

func (s *stats) inc(name string) { s.add(name, 1) }

func (s *stats) add(name string, d int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.get(name, counter)
	st.value = uint64(int64(st.value) + d)
}

// gaugeAdd changes a gauge by d.
func (s *stats) gaugeAdd(name string, d int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.get(name, gauge)
	st.value = uint64(int64(st.value) + d)
}

func (s *stats) set(name string, v uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.get(name, gauge).value = v
}

// snapshot returns the stats matching filter (nil = all), sorted by name.
func (s *stats) snapshot(filter *regexp.Regexp) []struct {
	name string
	stat
} {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []struct {
		name string
		stat
	}
	for n, st := range s.m {
		if filter == nil || filter.MatchString(n) {
			out = append(out, struct {
				name string
				stat
			}{n, *st})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// writeText writes Envoy's text format: "name: value" lines.
func (s *stats) writeText(w io.Writer, filter *regexp.Regexp) {
	for _, st := range s.snapshot(filter) {
		fmt.Fprintf(w, "%s: %d\n", st.name, st.value)
	}
}

var promInvalid = regexp.MustCompile(`[^a-zA-Z0-9_]`)

// writePrometheus writes the Prometheus text format with Envoy's naming
// (envoy_ prefix, dots and other characters become underscores). Envoy also
// extracts tags into labels; the agent's merge does not care, so we don't.
func (s *stats) writePrometheus(w io.Writer, filter *regexp.Regexp) {
	for _, st := range s.snapshot(filter) {
		name := "envoy_" + promInvalid.ReplaceAllString(st.name, "_")
		kind := "counter"
		if st.kind == gauge {
			kind = "gauge"
		}
		fmt.Fprintf(w, "# TYPE %s %s\n%s{} %d\n", name, kind, name, st.value)
	}
}

// listenerStatName is Envoy's stat prefix of a listener bound to host:port.
func listenerStatName(host string, port uint32) string {
	return fmt.Sprintf("listener.%s_%d", strings.Trim(host, "[]"), port)
}
