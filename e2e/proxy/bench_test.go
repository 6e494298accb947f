package proxy

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// vmRSS reads a process's resident set size in bytes from /proc.
func vmRSS(tb testing.TB, pid int) float64 {
	tb.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			if err != nil {
				tb.Fatal(err)
			}
			return kb * 1024
		}
	}
	tb.Fatal("no VmRSS")
	return 0
}

// BenchmarkAgentIdle starts the agent with envoysim and a control plane,
// waits until Envoy is ready and idle, and reports the agent's own resident
// memory (Istio's pilot-agent idles at about 36 MB on this machine class)
// and the time from exec of the agent to Envoy's start.
func BenchmarkAgentIdle(b *testing.B) {
	testenv.RequireRoot(b)
	ns := testenv.NewNetns(b, "pxbench")
	var startupRSS, idleRSS, spawn float64
	for i := 0; i < b.N; i++ {
		cpAddr := startControlPlane(b, ns, 9080)
		start := time.Now()
		a := startAgent(b, agentOpts{ns: ns, proxyConfig: `"terminationDrainDuration": "0s", ` + upstreamConfig(cpAddr),
			env: map[string]string{"OUTRIGGER_MEMTRIM_DELAY": "2s"}})
		for len(a.starts()) == 0 {
			time.Sleep(200 * time.Microsecond)
		}
		spawn += float64(time.Since(start).Microseconds()) / 1000
		a.waitReady(b)
		time.Sleep(time.Second) // let start-up garbage settle
		startupRSS += vmRSS(b, a.cmd.Process.Pid)
		// Idle: after the agent has returned its start-up pages, with the
		// status server still answering probes.
		time.Sleep(2 * time.Second)
		a.waitReady(b)
		idleRSS += vmRSS(b, a.cmd.Process.Pid)
		_ = a.cmd.Process.Signal(syscall.SIGTERM)
		a.exitCode(b, 30*time.Second)
	}
	b.ReportMetric(startupRSS/float64(b.N)/(1<<20), "agent-startup-RSS-MB")
	b.ReportMetric(idleRSS/float64(b.N)/(1<<20), "agent-idle-RSS-MB")
	b.ReportMetric(spawn/float64(b.N), "exec-to-envoy-ms")
}
