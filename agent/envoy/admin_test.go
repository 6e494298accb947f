package envoy

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseStats(t *testing.T) {
	in := `server.state: 0
listener_manager.workers_started: 1
cluster.xds-grpc.upstream_cx_total: 12
cluster_manager.cds.update_time: 1700000000000
http.admin.downstream_rq_time: P0(nan,0) P25(nan,0)
server.version_label: 1.2.3
garbage line
: 5
negative: -1
`
	want := Stats{
		"server.state":                       0,
		"listener_manager.workers_started":   1,
		"cluster.xds-grpc.upstream_cx_total": 12,
		"cluster_manager.cds.update_time":    1700000000000,
	}
	if diff := cmp.Diff(want, ParseStats(strings.NewReader(in))); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// fakeAdmin is a real HTTP server answering like Envoy's admin API from a
// mutable stats text, and recording the requests it got.
type fakeAdmin struct {
	srv *httptest.Server

	mu       sync.Mutex
	stats    string
	requests []string
}

func newFakeAdmin(t *testing.T) *fakeAdmin {
	t.Helper()
	f := &fakeAdmin{}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.requests = append(f.requests, r.Method+" "+r.URL.RequestURI())
		stats := f.stats
		f.mu.Unlock()
		switch r.URL.Path {
		case "/stats":
			fmt.Fprint(w, stats)
		case "/drain_listeners", "/quitquitquit":
			if r.Method != http.MethodPost {
				http.Error(w, "POST only", http.StatusMethodNotAllowed)
				return
			}
			fmt.Fprint(w, "OK\n")
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeAdmin) setStats(s string) {
	f.mu.Lock()
	f.stats = s
	f.mu.Unlock()
}

func (f *fakeAdmin) reqs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.requests...)
}

func (f *fakeAdmin) addr() netip.AddrPort {
	return netip.MustParseAddrPort(f.srv.Listener.Addr().String())
}

func TestActiveConnections(t *testing.T) {
	tests := []struct {
		stats string
		want  int
	}{
		{stats: "", want: -1},
		{stats: "listener.0.0.0.0_15006.downstream_cx_active: 3\nlistener.10.0.0.1_8080.downstream_cx_active: 2\n", want: 5},
		{stats: "listener.0.0.0.0_15006.downstream_cx_active: 3\n" +
			"listener.0.0.0.0_15006.worker_0.downstream_cx_active: 3\n" +
			"listener.0.0.0.0_15021.downstream_cx_active: 7\n" +
			"listener.0.0.0.0_15090.downstream_cx_active: 1\n" +
			"listener.admin.downstream_cx_active: 1\n" +
			"listener.envoy_internal_connect_originate.downstream_cx_active: 4\n" +
			"http.admin.downstream_cx_active: 1\n", want: 3},
		{stats: "listener.admin.downstream_cx_active: 1\n", want: 0},
	}
	f := newFakeAdmin(t)
	a := NewAdmin(f.addr())
	defer a.Close()
	for _, tt := range tests {
		f.setStats(tt.stats)
		got, err := a.ActiveConnections(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if got != tt.want {
			t.Errorf("stats %q: got %d, want %d", tt.stats, got, tt.want)
		}
	}
	if got, want := f.reqs()[0], "GET /stats?usedonly&filter=downstream_cx_active%24"; got != want {
		t.Errorf("request = %q, want %q", got, want)
	}
}

func TestDrainListeners(t *testing.T) {
	f := newFakeAdmin(t)
	a := NewAdmin(f.addr())
	defer a.Close()
	ctx := context.Background()
	for _, c := range []struct{ inbound, skip bool }{{true, false}, {false, false}, {true, true}} {
		if err := a.DrainListeners(ctx, c.inbound, c.skip); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{
		"POST /drain_listeners?inboundonly&graceful",
		"POST /drain_listeners?graceful",
		"POST /drain_listeners?inboundonly&graceful&skip_exit",
	}
	if diff := cmp.Diff(want, f.reqs()); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestAdminUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(l.Addr().String())
	l.Close()
	a := NewAdmin(addr)
	defer a.Close()
	if _, err := a.ActiveConnections(context.Background()); err == nil || !strings.Contains(err.Error(), "envoy admin GET /stats") {
		t.Errorf("err = %v, want an error naming the admin call", err)
	}
}
