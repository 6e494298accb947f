package health

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// probeApp is the application behind the rewritten probes. It records the
// source address of every request.
type probeApp struct {
	mu      sync.Mutex
	sources map[string]bool
}

func (a *probeApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		a.mu.Lock()
		a.sources[ap.Addr().String()] = true
		a.mu.Unlock()
	}
	switch r.URL.Path {
	case "/ok":
		_, _ = fmt.Fprint(w, "fine")
	case "/fail":
		w.WriteHeader(http.StatusInternalServerError)
		_, _ = fmt.Fprint(w, "broken")
	case "/notfound":
		http.NotFound(w, r)
	case "/redirect-same":
		http.Redirect(w, r, "/ok", http.StatusFound)
	case "/redirect-away":
		// Never followed: the probe stops at a redirect to another host.
		http.Redirect(w, r, "http://192.0.2.1/elsewhere", http.StatusMovedPermanently)
	case "/loop":
		http.Redirect(w, r, "/loop", http.StatusFound)
	case "/slow":
		select {
		case <-time.After(5 * time.Second):
		case <-r.Context().Done():
		}
	case "/big":
		_, _ = w.Write([]byte(strings.Repeat("x", 20<<10)))
	case "/headers":
		if r.Header.Get("X-Kubelet") != "k" || r.Header.Get("X-Configured") != "c" {
			w.WriteHeader(http.StatusBadRequest)
		}
		_, _ = fmt.Fprintf(w, "host=%s", r.Host)
	default:
		http.NotFound(w, r)
	}
}

func TestAppProbesHTTP(t *testing.T) {
	app := &probeApp{sources: map[string]bool{}}
	appAddr := serve(t, app)
	port := appAddr.Port()
	var probes []string
	for _, p := range []string{"ok", "fail", "notfound", "redirect-same", "redirect-away", "loop", "slow", "big"} {
		probes = append(probes, fmt.Sprintf(`"/app-health/%s/readyz":{"httpGet":{"path":"/%s","port":%d},"timeoutSeconds":1}`, p, p, port))
	}
	probes = append(probes, fmt.Sprintf(`"/app-health/headers/livez":{"httpGet":{"path":"headers","port":%d,"scheme":"HTTP",`+
		`"httpHeaders":[{"name":"X-Configured","value":"c"}]},"timeoutSeconds":2}`, port))
	parsed, err := ParseAppProbers("{" + strings.Join(probes, ",") + "}")
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(nil)
	cfg.AppProbers = parsed
	s := start(t, cfg)

	tests := []struct {
		path     string
		hdr      []string
		wantCode int
		wantBody string
	}{
		{"/app-health/ok/readyz", nil, 200, "fine"},
		{"/app-health/fail/readyz", nil, 500, "broken"},
		{"/app-health/notfound/readyz", nil, 404, "404 page not found\n"},
		{"/app-health/redirect-same/readyz", nil, 200, "fine"},
		{"/app-health/redirect-away/readyz", nil, 200, ""},
		{"/app-health/loop/readyz", nil, 500, ""},
		{"/app-health/slow/readyz", nil, 500, ""},
		{"/app-health/big/readyz", nil, 200, strings.Repeat("x", 10<<10)},
		{"/app-health/headers/livez", []string{"X-Kubelet", "k"}, 200, fmt.Sprintf("host=127.0.0.1:%d", port)},
		{"/app-health/headers/livez", []string{"X-Kubelet", "k", "Host", "example.com"}, 200, "host=example.com"},
		{"/app-health/unknown/readyz", nil, 400, "app prober config does not exist for /app-health/unknown/readyz"},
		{"/no/such/path", nil, 400, "app prober config does not exist for /no/such/path"},
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			code, body := get(t, s.StatusAddr(), tc.path, tc.hdr...)
			if code != tc.wantCode || body != tc.wantBody {
				if len(body) > 80 {
					body = body[:80] + "..."
				}
				t.Errorf("got %d %q, want %d %q", code, body, tc.wantCode, tc.wantBody)
			}
		})
	}
	app.mu.Lock()
	defer app.mu.Unlock()
	if len(app.sources) != 1 || !app.sources["127.0.0.6"] {
		t.Errorf("probes came from %v, want only 127.0.0.6", app.sources)
	}
}

func TestAppProbesTCP(t *testing.T) {
	open, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	from := make(chan string, 1)
	go func() {
		c, err := open.Accept()
		if err != nil {
			return
		}
		from <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().String()
		c.Close()
	}()
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := closed.Addr().(*net.TCPAddr).Port
	closed.Close()

	parsed, err := ParseAppProbers(fmt.Sprintf(`{"/app-health/a/livez":{"tcpSocket":{"port":%d}},"/app-health/b/livez":{"tcpSocket":{"port":%d}}}`,
		open.Addr().(*net.TCPAddr).Port, closedPort))
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(nil)
	cfg.AppProbers = parsed
	s := start(t, cfg)
	if code, _ := get(t, s.StatusAddr(), "/app-health/a/livez"); code != 200 {
		t.Errorf("open port: %d, want 200", code)
	}
	if src := <-from; src != "127.0.0.6" {
		t.Errorf("TCP probe came from %s, want 127.0.0.6", src)
	}
	if code, _ := get(t, s.StatusAddr(), "/app-health/b/livez"); code != 500 {
		t.Errorf("closed port: %d, want 500", code)
	}
}

func TestAppProbesGRPC(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	hs := grpchealth.NewServer()
	hs.SetServingStatus("up", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("down", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	go func() { _ = gs.Serve(ln) }()
	defer gs.Stop()
	port := ln.Addr().(*net.TCPAddr).Port

	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadPort := dead.Addr().(*net.TCPAddr).Port
	dead.Close()

	parsed, err := ParseAppProbers(fmt.Sprintf(`{
		"/app-health/server/livez":{"grpc":{"port":%[1]d}},
		"/app-health/up/livez":{"grpc":{"port":%[1]d,"service":"up"}},
		"/app-health/down/livez":{"grpc":{"port":%[1]d,"service":"down"}},
		"/app-health/unknown/livez":{"grpc":{"port":%[1]d,"service":"nope"}},
		"/app-health/dead/livez":{"grpc":{"port":%[2]d},"timeoutSeconds":1}}`, port, deadPort))
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(nil)
	cfg.AppProbers = parsed
	s := start(t, cfg)
	for path, want := range map[string]int{
		"/app-health/server/livez":  200,
		"/app-health/up/livez":      200,
		"/app-health/down/livez":    500,
		"/app-health/unknown/livez": 500,
		"/app-health/dead/livez":    500,
	} {
		if code, _ := get(t, s.StatusAddr(), path); code != want {
			t.Errorf("%s: %d, want %d", path, code, want)
		}
	}
}

func TestParseAppProbers(t *testing.T) {
	tests := []struct {
		name, in string
		want     AppProbe
		wantErr  string
	}{
		{name: "http defaults", in: `{"/app-health/c/readyz":{"httpGet":{"path":"healthz","port":8080}}}`,
			want: AppProbe{Kind: ProbeHTTPGet, Port: 8080, Path: "/healthz", Timeout: time.Second}},
		{name: "https with timeout", in: `{"/app-health/c/livez":{"httpGet":{"path":"/h","port":8443,"scheme":"HTTPS"},"timeoutSeconds":7}}`,
			want: AppProbe{Kind: ProbeHTTPGet, Port: 8443, Path: "/h", HTTPS: true, Timeout: 7 * time.Second}},
		{name: "tcp", in: `{"/app-health/c/startupz":{"tcpSocket":{"port":9000},"timeoutSeconds":3}}`,
			want: AppProbe{Kind: ProbeTCPSocket, Port: 9000, Timeout: 3 * time.Second}},
		{name: "grpc", in: `{"/app-health/c/livez":{"grpc":{"port":9090,"service":"s"}}}`,
			want: AppProbe{Kind: ProbeGRPC, Port: 9090, Service: "s", Timeout: time.Second}},
		{name: "named port", in: `{"/app-health/c/livez":{"httpGet":{"path":"/","port":"http"}}}`,
			wantErr: `ISTIO_KUBE_APP_PROBERS: probe "/app-health/c/livez": httpGet.port: named port "http" is not supported`},
		{name: "two kinds", in: `{"/app-health/c/livez":{"httpGet":{"port":1},"tcpSocket":{"port":1}}}`,
			wantErr: `probe "/app-health/c/livez": exactly one of httpGet, tcpSocket or grpc`},
		{name: "bad path", in: `{"/healthz/ready":{"tcpSocket":{"port":1}}}`,
			wantErr: `probe "/healthz/ready": path must look like`},
		{name: "port zero", in: `{"/app-health/c/livez":{"tcpSocket":{"port":0}}}`,
			wantErr: `tcpSocket.port: 0 is not a port number`},
		{name: "bad scheme", in: `{"/app-health/c/livez":{"httpGet":{"port":1,"scheme":"FTP"}}}`,
			wantErr: `httpGet.scheme "FTP"`},
		{name: "not json", in: `{`, wantErr: `ISTIO_KUBE_APP_PROBERS: not a JSON object`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseAppProbers(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 {
				t.Fatalf("got %d probes, want 1", len(got))
			}
			for _, p := range got {
				if p.Kind != tc.want.Kind || p.Port != tc.want.Port || p.Path != tc.want.Path ||
					p.HTTPS != tc.want.HTTPS || p.Service != tc.want.Service || p.Timeout != tc.want.Timeout {
					t.Errorf("got %+v, want %+v", p, tc.want)
				}
			}
		})
	}
	if got, err := ParseAppProbers("  "); err != nil || got != nil {
		t.Errorf("empty: %v %v, want nil nil", got, err)
	}
}

func FuzzParseAppProbers(f *testing.F) {
	f.Add(`{"/app-health/c/readyz":{"httpGet":{"path":"/h","port":8080,"httpHeaders":[{"name":"a","value":"b"}]},"timeoutSeconds":3}}`)
	f.Add(`{"/app-health/c/livez":{"grpc":{"port":9090,"service":"s"}}}`)
	f.Add(`{"/app-health/c/livez":{"tcpSocket":{"port":"x"}}}`)
	f.Fuzz(func(t *testing.T, s string) {
		probes, err := ParseAppProbers(s)
		if err != nil {
			return
		}
		for path, p := range probes {
			if !appProbePath.MatchString(path) || p.Port == 0 || p.Timeout <= 0 {
				t.Fatalf("accepted an invalid probe %q: %+v", path, p)
			}
		}
	})
}

// HTTPS probes skip certificate checks (the app's cert is self-signed, as
// kubelet allows) and speak HTTP/2 unless ISTIO_ENABLE_HTTP2_PROBING=false.
func TestAppProbesHTTPS(t *testing.T) {
	app := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprint(w, r.Proto)
	}))
	app.EnableHTTP2 = true
	app.StartTLS()
	defer app.Close()
	port := netip.MustParseAddrPort(app.Listener.Addr().String()).Port()
	for _, tc := range []struct {
		http2 bool
		want  string
	}{{true, "HTTP/2.0"}, {false, "HTTP/1.1"}} {
		parsed, err := ParseAppProbers(fmt.Sprintf(`{"/app-health/tls/readyz":{"httpGet":{"path":"/","port":%d,"scheme":"HTTPS"}}}`, port))
		if err != nil {
			t.Fatal(err)
		}
		cfg := testConfig(nil)
		cfg.AppProbers = parsed
		cfg.ProbeHTTP2 = tc.http2
		s := start(t, cfg)
		if code, body := get(t, s.StatusAddr(), "/app-health/tls/readyz"); code != 200 || body != tc.want {
			t.Errorf("http2=%v: %d %q, want 200 %q", tc.http2, code, body, tc.want)
		}
	}
}
