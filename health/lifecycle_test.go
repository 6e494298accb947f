package health

import (
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
)

func TestLifecycleEndpoints(t *testing.T) {
	var quits, drains atomic.Int64
	cfg := testConfig(nil)
	cfg.OnQuit = func() { quits.Add(1) }
	cfg.OnDrain = func() { drains.Add(1) }
	s := start(t, cfg)

	if code, _ := get(t, s.StatusAddr(), "/healthz/ready"); code != 200 {
		t.Fatalf("ready before: %d", code)
	}
	for _, path := range []string{"/quitquitquit", "/drain"} {
		if code, _ := do(t, http.MethodGet, s.StatusAddr(), path); code != http.StatusMethodNotAllowed {
			t.Errorf("GET %s: %d, want 405", path, code)
		}
		if code, _ := do(t, http.MethodPut, s.StatusAddr(), path); code != http.StatusMethodNotAllowed {
			t.Errorf("PUT %s: %d, want 405", path, code)
		}
	}
	if quits.Load()+drains.Load() != 0 {
		t.Fatalf("hooks ran on rejected requests")
	}
	if code, body := do(t, http.MethodPost, s.StatusAddr(), "/drain"); code != 200 || body != "OK" {
		t.Errorf("POST /drain: %d %q, want 200 OK", code, body)
	}
	if drains.Load() != 1 {
		t.Errorf("OnDrain ran %d times, want 1", drains.Load())
	}
	if code, _ := get(t, s.ReadinessAddr(), "/healthz/ready"); code != 503 {
		t.Errorf("ready after /drain: %d, want 503", code)
	}
	if code, body := do(t, http.MethodPost, s.StatusAddr(), "/quitquitquit"); code != 200 || body != "OK" {
		t.Errorf("POST /quitquitquit: %d %q, want 200 OK", code, body)
	}
	if quits.Load() != 1 {
		t.Errorf("OnQuit ran %d times, want 1", quits.Load())
	}
	// The readiness port serves readiness only.
	if code, _ := do(t, http.MethodPost, s.ReadinessAddr(), "/quitquitquit"); code != 404 {
		t.Errorf("POST /quitquitquit on the readiness port: %d, want 404", code)
	}
}

func TestLifecycleHooksNotWired(t *testing.T) {
	s := start(t, testConfig(nil))
	for _, path := range []string{"/quitquitquit", "/drain"} {
		if code, _ := do(t, http.MethodPost, s.StatusAddr(), path); code != http.StatusNotImplemented {
			t.Errorf("POST %s without hook: %d, want 501", path, code)
		}
	}
	if code, _ := get(t, s.StatusAddr(), "/healthz/ready"); code != 200 {
		t.Errorf("an unwired endpoint must not change readiness: %d", code)
	}
}

// Loopback-only endpoints judge the connection's address, never headers.
// (The e2e test repeats this over a real veth from another namespace.)
func TestLoopbackOnly(t *testing.T) {
	var quits atomic.Int64
	cfg := testConfig(nil)
	cfg.OnQuit = func() { quits.Add(1) }
	cfg.OnDrain = func() {}
	cfg.MetricsLocalhostOnly = true
	cfg.NameTable = func() any { return map[string]string{"a": "b"} }
	s, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	h := s.statusHandler()
	tests := []struct {
		method, path, remote string
		want                 int
	}{
		{"POST", "/quitquitquit", "10.0.0.9:4000", 403},
		{"GET", "/quitquitquit", "10.0.0.9:4000", 403},
		{"POST", "/drain", "[fd00::9]:4000", 403},
		{"GET", "/debug/pprof/", "10.0.0.9:4000", 403},
		{"GET", "/debug/pprof/cmdline", "10.0.0.9:4000", 403},
		{"GET", "/debug/ndsz", "10.0.0.9:4000", 403},
		{"GET", "/stats/prometheus", "10.0.0.9:4000", 403},
		{"GET", "/debug/ndsz", "127.0.0.1:4000", 200},
		{"GET", "/debug/pprof/cmdline", "[::1]:4000", 200},
		{"GET", "/debug/ndsz", "[::ffff:127.0.0.1]:4000", 200},
		{"GET", "/debug/ndsz", "garbage", 403},
	}
	for _, tc := range tests {
		req := httptest.NewRequest(tc.method, tc.path, nil)
		req.RemoteAddr = tc.remote
		req.Header.Set("X-Forwarded-For", "127.0.0.1")
		req.Header.Set("X-Real-Ip", "127.0.0.1")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != tc.want {
			t.Errorf("%s %s from %s: %d, want %d", tc.method, tc.path, tc.remote, rec.Code, tc.want)
		}
	}
	if quits.Load() != 0 {
		t.Errorf("OnQuit ran from a remote address")
	}
	s.baseCancel()
}

func TestNdsz(t *testing.T) {
	var table atomic.Pointer[map[string][]string]
	cfg := testConfig(nil)
	cfg.NameTable = func() any {
		if p := table.Load(); p != nil {
			return *p
		}
		return nil
	}
	s := start(t, cfg)
	if code, body := get(t, s.StatusAddr(), "/debug/ndsz"); code != 404 || body != "{}" {
		t.Errorf("no table: %d %q, want 404 {}", code, body)
	}
	table.Store(&map[string][]string{"db.example.com": {"10.0.0.5"}})
	if code, body := get(t, s.StatusAddr(), "/debug/ndsz"); code != 200 || body != `{"db.example.com":["10.0.0.5"]}` {
		t.Errorf("table: %d %q", code, body)
	}
}
