package health

import (
	"context"
	"io"
	"net/http"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// BenchmarkReadiness measures GET /healthz/ready on the readiness port with
// parallel clients, once Envoy has been ready (the steady state kubelet
// sees), with and without goroutines burning every CPU (standing in for the
// DNS proxy under load), with kept-alive connections and with a new
// connection per probe as kubelet does. p99-ms is the slowest 1% of probes.
func BenchmarkReadiness(b *testing.B) {
	for _, bc := range []struct {
		name      string
		burn      bool
		keepAlive bool
	}{
		{"idle/keepalive", false, true},
		{"idle/newconn", false, false},
		{"cpuload/keepalive", true, true},
		{"cpuload/newconn", true, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			admin := newFakeAdmin(b)
			admin.set(liveStats())
			s := start(b, testConfig(admin))
			url := "http://" + s.ReadinessAddr().String() + "/healthz/ready"
			tr := &http.Transport{DisableKeepAlives: !bc.keepAlive, MaxIdleConnsPerHost: 64}
			defer tr.CloseIdleConnections()
			c := &http.Client{Transport: tr, Timeout: 3 * time.Second} // kubelet's probe timeout in Istio's template

			if bc.burn {
				ctx, cancel := context.WithCancel(context.Background())
				var wg sync.WaitGroup
				for range 2 * runtime.GOMAXPROCS(0) {
					wg.Add(1)
					go func() { defer wg.Done(); burn(ctx) }()
				}
				defer func() { cancel(); wg.Wait() }()
			}

			var mu sync.Mutex
			var lat []time.Duration
			b.SetParallelism(4)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				var mine []time.Duration
				for pb.Next() {
					t0 := time.Now()
					resp, err := c.Get(url)
					if err != nil {
						b.Errorf("probe failed: %v", err)
						return
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						b.Errorf("probe: %d", resp.StatusCode)
						return
					}
					mine = append(mine, time.Since(t0))
				}
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			})
			b.StopTimer()
			if len(lat) > 0 {
				slices.Sort(lat)
				b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
				b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
			}
		})
	}
}

// burn spins until ctx ends, checking it rarely so it really hogs a CPU.
func burn(ctx context.Context) {
	x := 1
	for {
		for i := range 1 << 20 {
			x = x*31 + i
		}
		if ctx.Err() != nil {
			if x == 42 {
				println()
			}
			return
		}
	}
}
