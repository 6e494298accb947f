package health

import (
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestReadinessFromEnvoyStats(t *testing.T) {
	tests := []struct {
		name  string
		stats map[string]uint64
		want  int
	}{
		{"nothing yet", map[string]uint64{}, 503},
		{"live but no config", map[string]uint64{"server.state": 0, "listener_manager.workers_started": 1}, 503},
		{"cds only", map[string]uint64{"server.state": 0, "listener_manager.workers_started": 1, "cluster_manager.cds.update_success": 1}, 503},
		{"config rejected", map[string]uint64{"server.state": 0, "listener_manager.workers_started": 1,
			"cluster_manager.cds.update_rejected": 1, "listener_manager.lds.update_rejected": 1}, 503},
		{"initializing", map[string]uint64{"server.state": 3, "listener_manager.workers_started": 1,
			"cluster_manager.cds.update_success": 1, "listener_manager.lds.update_success": 1}, 503},
		{"workers not started", map[string]uint64{"server.state": 0, "listener_manager.workers_started": 0,
			"cluster_manager.cds.update_success": 1, "listener_manager.lds.update_success": 1}, 503},
		{"no server.state", map[string]uint64{"listener_manager.workers_started": 1,
			"cluster_manager.cds.update_success": 1, "listener_manager.lds.update_success": 1}, 503},
		{"live with config", liveStats(), 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			admin := newFakeAdmin(t)
			admin.set(tc.stats)
			s := start(t, testConfig(admin))
			for _, addr := range []string{"status", "readiness"} {
				a := s.StatusAddr()
				if addr == "readiness" {
					a = s.ReadinessAddr()
				}
				code, body := get(t, a, "/healthz/ready")
				if code != tc.want || body != "" {
					t.Errorf("%s port: got %d %q, want %d with an empty body", addr, code, body, tc.want)
				}
			}
		})
	}
}

// The admin query must carry Istio's filter so Envoy returns only the
// readiness stats.
func TestReadinessQuery(t *testing.T) {
	admin := newFakeAdmin(t)
	admin.set(liveStats())
	s := start(t, testConfig(admin))
	get(t, s.StatusAddr(), "/healthz/ready")
	raw := *admin.lastRaw.Load()
	q, err := url.ParseQuery(raw)
	if err != nil {
		t.Fatalf("query %q: %v", raw, err)
	}
	if _, ok := q["usedonly"]; !ok {
		t.Errorf("query %q lacks usedonly", raw)
	}
	for _, stat := range []string{`server\.state`, `listener_manager\.workers_started`, `cluster_manager\.cds\.update_`, `listener_manager\.lds\.update_`} {
		if !strings.Contains(q.Get("filter"), stat) {
			t.Errorf("filter %q lacks %s", q.Get("filter"), stat)
		}
	}
}

func TestReadinessStickyAndDraining(t *testing.T) {
	admin := newFakeAdmin(t)
	cfg := testConfig(admin)
	cfg.ReadinessCacheTTL = time.Nanosecond // every probe asks Envoy until ready
	s := start(t, cfg)

	if code, _ := get(t, s.ReadinessAddr(), "/healthz/ready"); code != 503 {
		t.Fatalf("before config: %d, want 503", code)
	}
	admin.set(liveStats())
	if code, _ := get(t, s.ReadinessAddr(), "/healthz/ready"); code != 200 {
		t.Fatalf("once live: %d, want 200", code)
	}
	// Sticky: Envoy draining or its admin failing no longer matters, and
	// Envoy is no longer asked.
	asked := admin.requests.Load()
	admin.set(map[string]uint64{"server.state": 1})
	admin.mu.Lock()
	admin.status = 500
	admin.mu.Unlock()
	for range 3 {
		if code, _ := get(t, s.ReadinessAddr(), "/healthz/ready"); code != 200 {
			t.Fatalf("after ready, admin failing: %d, want 200 (sticky)", code)
		}
	}
	if n := admin.requests.Load(); n != asked {
		t.Errorf("admin asked %d more times after ready, want 0", n-asked)
	}
	if got := gaugeValue(t, s, "outrigger_startup_duration_seconds"); got <= 0 {
		t.Errorf("outrigger_startup_duration_seconds = %v, want > 0", got)
	}

	s.SetDraining()
	for _, a := range []struct {
		name string
		code int
	}{{"status", 503}, {"readiness", 503}} {
		addr := s.StatusAddr()
		if a.name == "readiness" {
			addr = s.ReadinessAddr()
		}
		if code, _ := get(t, addr, "/healthz/ready"); code != a.code {
			t.Errorf("%s port while draining: %d, want %d", a.name, code, a.code)
		}
	}
}

// A restarted Envoy is not ready until it is LIVE with its config again:
// the sticky state belongs to the process that earned it.
func TestReadinessAfterEnvoyExit(t *testing.T) {
	admin := newFakeAdmin(t)
	cfg := testConfig(admin)
	cfg.ReadinessCacheTTL = time.Nanosecond
	s := start(t, cfg)
	admin.set(liveStats())
	if code, _ := get(t, s.ReadinessAddr(), "/healthz/ready"); code != 200 {
		t.Fatalf("once live: %d, want 200", code)
	}
	// Envoy died; its successor is still starting.
	admin.set(map[string]uint64{"server.state": 2})
	s.EnvoyExited()
	if code, _ := get(t, s.ReadinessAddr(), "/healthz/ready"); code != 503 {
		t.Fatalf("after Envoy exited, new one pre-initializing: %d, want 503", code)
	}
	admin.set(liveStats())
	if code, _ := get(t, s.ReadinessAddr(), "/healthz/ready"); code != 200 {
		t.Fatalf("new Envoy live: %d, want 200", code)
	}
}

func TestReadinessDNS(t *testing.T) {
	admin := newFakeAdmin(t)
	admin.set(liveStats())
	var dns atomic.Bool
	cfg := testConfig(admin)
	cfg.DNSReady = dns.Load
	s := start(t, cfg)
	if code, _ := get(t, s.StatusAddr(), "/healthz/ready"); code != 503 {
		t.Fatalf("Envoy ready, DNS table missing: %d, want 503", code)
	}
	dns.Store(true)
	if code, _ := get(t, s.StatusAddr(), "/healthz/ready"); code != 200 {
		t.Fatalf("DNS table arrived: %d, want 200", code)
	}
}

func TestReadinessNoEnvoy(t *testing.T) {
	s := start(t, testConfig(nil))
	if code, _ := get(t, s.StatusAddr(), "/healthz/ready"); code != 200 {
		t.Fatalf("DISABLE_ENVOY: %d, want 200", code)
	}
}

// A probe storm while Envoy is not ready costs Envoy one admin query per
// cache period, not one per probe.
func TestReadinessProbeStormIsCached(t *testing.T) {
	admin := newFakeAdmin(t)
	admin.mu.Lock()
	admin.delay = 50 * time.Millisecond // every prober arrives while one query is in flight
	admin.mu.Unlock()
	cfg := testConfig(admin)
	cfg.ReadinessCacheTTL = time.Hour
	s := start(t, cfg)
	var wg sync.WaitGroup
	var wrong atomic.Int64
	for range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if code, _ := get(t, s.ReadinessAddr(), "/healthz/ready"); code != 503 {
				wrong.Add(1)
			}
		}()
	}
	wg.Wait()
	if wrong.Load() != 0 {
		t.Errorf("%d probes were not 503", wrong.Load())
	}
	if n := admin.requests.Load(); n != 1 {
		t.Errorf("admin got %d queries for 100 probes, want 1", n)
	}
}

// An admin that hangs makes readiness 503 after AdminTimeout, not a probe
// that hangs with it.
func TestReadinessAdminHangs(t *testing.T) {
	admin := newFakeAdmin(t)
	admin.mu.Lock()
	admin.delay = time.Hour
	admin.mu.Unlock()
	cfg := testConfig(admin)
	cfg.AdminTimeout = 100 * time.Millisecond
	s := start(t, cfg)
	if code, _ := get(t, s.StatusAddr(), "/healthz/ready"); code != http.StatusServiceUnavailable {
		t.Fatalf("admin hanging: %d, want 503", code)
	}
}

func TestParseEnvoyStats(t *testing.T) {
	got := parseEnvoyStats([]byte("server.state: 0\nlistener_manager.workers_started: 1\ngarbage\nx: notanumber\ncluster_manager.cds.update_success:  7 \n"))
	want := map[string]uint64{"server.state": 0, "listener_manager.workers_started": 1, "cluster_manager.cds.update_success": 7}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %d, want %d", k, got[k], v)
		}
	}
}

func FuzzParseEnvoyStats(f *testing.F) {
	f.Add([]byte("server.state: 0\nlistener_manager.workers_started: 1\n"))
	f.Add([]byte("a:b:c\n: 1\n\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := &readiness{}
		_ = r.judge(parseEnvoyStats(b))
	})
}
