package health

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var loopback4 = netip.MustParseAddr("127.0.0.1")

// fakeAdmin stands in for Envoy's admin /stats: it answers the readiness
// query with the stats it holds and counts the requests.
type fakeAdmin struct {
	mu       sync.Mutex
	stats    map[string]uint64
	status   int
	delay    time.Duration
	requests atomic.Int64
	lastRaw  atomic.Pointer[string]
	addr     netip.AddrPort
}

func (f *fakeAdmin) set(stats map[string]uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stats = stats
}

func (f *fakeAdmin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.requests.Add(1)
	raw := r.URL.RawQuery
	f.lastRaw.Store(&raw)
	f.mu.Lock()
	stats, status, delay := f.stats, f.status, f.delay
	f.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	if r.URL.Path != "/stats" {
		http.NotFound(w, r)
		return
	}
	if status != 0 {
		w.WriteHeader(status)
		return
	}
	for k, v := range stats {
		fmt.Fprintf(w, "%s: %d\n", k, v)
	}
}

// liveStats is what a ready Envoy answers.
func liveStats() map[string]uint64 {
	return map[string]uint64{
		"server.state":                        0,
		"listener_manager.workers_started":    1,
		"cluster_manager.cds.update_success":  1,
		"listener_manager.lds.update_success": 1,
	}
}

// serve runs h on 127.0.0.1:0 until the test ends and returns its address.
func serve(t testing.TB, h http.Handler) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			srv.Close()
		}
		<-done
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func newFakeAdmin(t testing.TB) *fakeAdmin {
	f := &fakeAdmin{stats: map[string]uint64{}}
	f.addr = serve(t, f)
	return f
}

// testConfig binds to loopback on free ports and points at the fakes.
func testConfig(admin *fakeAdmin) Config {
	cfg := DefaultConfig()
	cfg.StatusPort, cfg.ReadinessPort = 0, 0
	cfg.BindAddr = loopback4
	cfg.PodIP = loopback4
	if admin != nil {
		cfg.EnvoyAdminPort = admin.addr.Port()
	} else {
		cfg.EnvoyDisabled = true
	}
	cfg.MergeEnvoyStats = false
	return cfg
}

// start runs a Server until the test ends, and fails the test if Run fails.
func start(t testing.TB, cfg Config) *Server {
	t.Helper()
	var log *zap.Logger
	if tt, ok := t.(*testing.T); ok {
		log = zaptest.NewLogger(tt, zaptest.Level(zap.WarnLevel))
	} else {
		log = zap.NewNop()
	}
	s, err := New(cfg, log)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	select {
	case <-s.Listening():
	case err := <-errc:
		cancel()
		t.Fatalf("Run: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return s
}

// client never reuses connections, so nothing lingers for goleak.
var client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// get returns the status and body of GET http://addr/path.
func get(t testing.TB, addr netip.AddrPort, path string, hdr ...string) (int, string) {
	t.Helper()
	return do(t, http.MethodGet, addr, path, hdr...)
}

func do(t testing.TB, method string, addr netip.AddrPort, path string, hdr ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+addr.String()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if strings.EqualFold(hdr[i], "Host") {
			req.Host = hdr[i+1]
			continue
		}
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// gaugeValue reads an unlabelled gauge from the server's registry.
func gaugeValue(t testing.TB, s *Server, name string) float64 {
	t.Helper()
	fams, err := s.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name && len(f.GetMetric()) == 1 {
			return f.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no gauge %s", name)
	return 0
}
