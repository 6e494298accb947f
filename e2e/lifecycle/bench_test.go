package lifecycle

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
	"github.com/outrigger-mesh/outrigger/e2e/podlife"
)

// BenchmarkReadinessUnderDNSLoad runs the sidecar in its pod, saturates its
// DNS proxy with dnsperf from the app's side (name-table hits), and at the
// same time probes readiness from outside the pod the way kubelet does (a
// new connection per probe, 3 s timeout). It reports both rates and the
// probe latency; a failed or timed-out probe fails the benchmark, because
// kubelet would restart or unready the pod for it.
func BenchmarkReadinessUnderDNSLoad(b *testing.B) {
	testenv.RequireCommands(b, "dnsperf")
	pod := newPod(b)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for _, s := range pod.Start() {
		if _, err := s.Run(ctx); err != nil {
			b.Fatalf("%s: %v", s.Name, err)
		}
	}
	queries := filepath.Join(pod.Dir(), "queries.txt")
	var q strings.Builder
	for i := 0; i < 100; i++ {
		q.WriteString(podlife.ServiceHost + " A\nreviews.default.svc.cluster.local AAAA\n")
	}
	if err := os.WriteFile(queries, []byte(q.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	const seconds = "5"
	tool := testenv.Build(b, "./e2e/demo")
	var dnsQPS, probeRPS, p99, maxMS, failures, lost float64
	for i := 0; i < b.N; i++ {
		var wg sync.WaitGroup
		var dnsOut, probeOut string
		var dnsErr, probeErr error
		wg.Add(2)
		go func() {
			defer wg.Done()
			dnsOut, dnsErr = pod.InPod(ctx, "dnsperf", "-s", "127.0.0.1", "-p", "15053", "-d", queries,
				"-l", seconds, "-c", "4", "-q", "500")
		}()
		go func() {
			defer wg.Done()
			probeOut, probeErr = pod.InPeer(ctx, tool, "probeload", "http://"+podlife.PodIP+":15021/healthz/ready", seconds, "8")
		}()
		wg.Wait()
		if dnsErr != nil || probeErr != nil {
			b.Fatalf("dnsperf: %v\nprobes: %v", dnsErr, probeErr)
		}
		dnsQPS += field(b, dnsOut, `Queries per second:\s+([0-9.]+)`)
		lost += field(b, dnsOut, `Queries lost:\s+([0-9]+)`)
		probeRPS += field(b, probeOut, `rps=([0-9.]+)`)
		p99 += field(b, probeOut, `p99_ms=([0-9.]+)`)
		maxMS = max(maxMS, field(b, probeOut, `max_ms=([0-9.]+)`))
		failures += field(b, probeOut, `failures=([0-9]+)`)
		b.Log(strings.TrimSpace(probeOut))
	}
	n := float64(b.N)
	b.ReportMetric(dnsQPS/n, "dns-qps")
	b.ReportMetric(lost/n, "dns-lost")
	b.ReportMetric(probeRPS/n, "probes/s")
	b.ReportMetric(p99/n, "probe-p99-ms")
	b.ReportMetric(maxMS, "probe-max-ms")
	if failures > 0 {
		b.Errorf("%v readiness probes failed or timed out under DNS load", failures)
	}
}

func field(b *testing.B, out, re string) float64 {
	b.Helper()
	m := regexp.MustCompile(re).FindStringSubmatch(out)
	if m == nil {
		b.Fatalf("no %s in:\n%s", re, out)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		b.Fatal(fmt.Errorf("%s: %w", re, err))
	}
	return v
}
