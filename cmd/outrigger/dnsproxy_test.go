package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/miekg/dns"
	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/dnsproxy"
)

func TestDNSConfigFromEnv(t *testing.T) {
	tests := []struct {
		name    string
		env     map[string]string
		uid     int
		want    dnsproxy.Config
		wantErr string
	}{
		{name: "defaults", env: map[string]string{"POD_NAMESPACE": "shop"},
			want: dnsproxy.Config{Namespace: "shop", Domain: "shop.svc.cluster.local"}},
		{name: "everything", env: map[string]string{
			"DNS_PROXY_ADDR": "127.0.0.1:15054", "DNS_FORWARD_PARALLEL": "true", "DNS_FORWARD_TIMEOUT": "2s",
			"DNS_CACHE": "false", "DNS_SERVE_STALE": "false", "DNS_CACHE_SIZE": "100"},
			want: dnsproxy.Config{ListenAddr: "127.0.0.1:15054", ForwardParallel: true, ForwardTimeout: 2 * time.Second,
				CacheDisabled: true, ServeStaleDisabled: true, CacheSize: 100}},
		{name: "port 53 as root answers before sync", env: map[string]string{"DNS_PROXY_ADDR": "localhost:53"}, uid: 0,
			want: dnsproxy.Config{ListenAddr: "localhost:53", RespondBeforeSync: true}},
		{name: "port 53 without root falls back", env: map[string]string{"DNS_PROXY_ADDR": "localhost:53"}, uid: 1337,
			want: dnsproxy.Config{ListenAddr: dnsproxy.DefaultListenAddr}},
		{name: "bad timeout", env: map[string]string{"DNS_FORWARD_TIMEOUT": "5"}, wantErr: "DNS_FORWARD_TIMEOUT=\"5\""},
		{name: "bad bool", env: map[string]string{"DNS_CACHE": "maybe"}, wantErr: "DNS_CACHE=\"maybe\""},
		{name: "bad size", env: map[string]string{"DNS_CACHE_SIZE": "-1"}, wantErr: "DNS_CACHE_SIZE"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := dnsConfigFromEnv(func(k string) string { return tc.env[k] }, tc.uid, zap.NewNop())
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			// ResolvConf depends on the host (/var/lib/istio/resolv.conf).
			if diff := cmp.Diff(tc.want, got, cmpopts.IgnoreFields(dnsproxy.Config{}, "ResolvConf")); diff != "" {
				t.Errorf("config (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDNSProxyEnabled(t *testing.T) {
	tests := []struct {
		env       map[string]string
		proxyType string
		want      bool
	}{
		{map[string]string{}, "sidecar", false},
		{map[string]string{"ISTIO_META_DNS_CAPTURE": "true"}, "sidecar", true},
		{map[string]string{"ISTIO_META_DNS_CAPTURE": "true"}, "router", false},
		{map[string]string{"ISTIO_META_ENABLE_DNS_SERVER": "true"}, "router", true},
	}
	for _, tc := range tests {
		got, err := dnsProxyEnabled(func(k string) string { return tc.env[k] }, tc.proxyType)
		if err != nil || got != tc.want {
			t.Errorf("%v %s: %v %v, want %v", tc.env, tc.proxyType, got, err, tc.want)
		}
	}
}

func freeUDPPort(t *testing.T) string {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().String()
}

func TestDNSProxyCommand(t *testing.T) {
	dir := t.TempDir()
	table := filepath.Join(dir, "table.json")
	resolv := filepath.Join(dir, "resolv.conf")
	if err := os.WriteFile(table, []byte(`{"table": {"svc.example.com": {"ips": ["192.0.2.5"]}}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(resolv, []byte("search ns.svc.cluster.local\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := freeUDPPort(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		root := newRootCmd()
		root.SetArgs([]string{"dns-proxy", "--name-table", table, "--listen", addr, "--resolv-conf", resolv, "--log_output_level", "default:warn"})
		done <- root.ExecuteContext(ctx)
	}()
	var r *dns.Msg
	m := new(dns.Msg)
	m.SetQuestion("svc.example.com.", dns.TypeA)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var err error
		if r, _, err = (&dns.Client{Timeout: 200 * time.Millisecond}).Exchange(m, addr); err == nil && len(r.Answer) == 1 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if r == nil || len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "192.0.2.5" {
		t.Fatalf("answer %v", r)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("dns-proxy: %v", err)
	}

	// A broken table file fails at start, naming the flag, file and field.
	if err := os.WriteFile(table, []byte(`{"table": {"svc.example.com": {"ips": ["x"]}}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	root := newRootCmd()
	root.SetArgs([]string{"dns-proxy", "--name-table", table, "--listen", addr, "--resolv-conf", resolv})
	err := root.ExecuteContext(context.Background())
	if err == nil || !strings.Contains(err.Error(), "--name-table") || !strings.Contains(err.Error(), table) || !strings.Contains(err.Error(), "ips[0]") {
		t.Fatalf("error %v", err)
	}
	// A pod IP is refused.
	root = newRootCmd()
	root.SetArgs([]string{"dns-proxy", "--name-table", table, "--listen", "10.1.2.3:15053", "--resolv-conf", resolv})
	if err := os.WriteFile(table, []byte(`{"table": {}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := root.ExecuteContext(context.Background()); err == nil || !strings.Contains(err.Error(), "not a loopback address") {
		t.Fatalf("error %v", err)
	}
}
