// Package maxprocs sets how many threads may run the agent's Go code at
// once (GOMAXPROCS) in proxy mode.
//
// The agent shares its pod with Envoy and does little computing of its
// own: it relays xDS bytes, answers DNS and probes. With more than one P,
// the Go scheduler wakes and spins a second thread at nearly every hand-off
// between goroutines; on the xDS relay that costs more CPU than the
// parallelism gives back, and the cycles are taken from Envoy and the
// application beside it. With one P a 3000-service push cost the agent
// 11-18% less CPU and arrived 0.7-1.6 ms sooner (BenchmarkPush3000 with a
// default-Go agent as XDS_BENCH_VARIANT, both in one run), and the
// agent never takes more than one core from the pod. The price is DNS
// throughput at saturation (a few % to 11% fewer queries/s at 70,000+ per
// second, far above what one pod asks).
package maxprocs

import "runtime"

// Default is the agent's GOMAXPROCS when the environment does not set one.
const Default = 1

// Apply sets GOMAXPROCS to n, unless the GOMAXPROCS environment variable
// is set (the operator's choice, which the runtime has already applied) or
// n is below 1. It returns the value in effect.
func Apply(getenv func(string) string, n int) int {
	if getenv("GOMAXPROCS") != "" || n < 1 {
		return runtime.GOMAXPROCS(0)
	}
	runtime.GOMAXPROCS(n)
	return n
}
