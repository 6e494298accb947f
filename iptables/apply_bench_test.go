package iptables

import (
	"context"
	"fmt"
	"os/exec"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"
)

// The benchmarks time one apply and one cleanup of the injector's default
// flags (-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x ” -b '*'
// -d 15090,15021,15020) in a fresh namespace, as the init container runs
// it. Besides ns/op they report the median ("ms-median").

func benchNetns(b *testing.B, i int) (string, func()) {
	b.Helper()
	name := fmt.Sprintf("or-b-%d", i)
	_ = exec.Command("ip", "netns", "del", name).Run()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		b.Fatalf("ip netns add: %v: %s", err, out)
	}
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		b.Fatalf("lo up: %v: %s", err, out)
	}
	return "/run/netns/" + name, func() { _ = exec.Command("ip", "netns", "del", name).Run() }
}

func benchConfig(b *testing.B) *Config {
	b.Helper()
	kernelNetns(b) // skips without root or tools
	return configFor(&testing.T{}, goldenCase{args: injectorArgs})
}

func BenchmarkApply(b *testing.B) {
	cfg := benchConfig(b)
	plan := mustBuild(b, cfg)
	runBench(b, func(string) error { return nil }, func(ns string) error {
		c := *cfg
		c.NetworkNamespace = ns
		return Execute(context.Background(), &c, plan, zap.NewNop())
	})
}

func BenchmarkCleanup(b *testing.B) {
	cfg := benchConfig(b)
	plan := mustBuild(b, cfg)
	runBench(b, func(ns string) error {
		c := *cfg
		c.NetworkNamespace = ns
		return Execute(context.Background(), &c, plan, zap.NewNop())
	}, func(ns string) error {
		c := *cfg
		c.NetworkNamespace, c.CleanupOnly = ns, true
		return Execute(context.Background(), &c, plan, zap.NewNop())
	})
}

// runBench times measured in a fresh namespace prepared by setup.
func runBench(b *testing.B, setup, measured func(ns string) error) {
	var times []time.Duration
	b.StopTimer()
	for i := 0; i < b.N; i++ {
		ns, del := benchNetns(b, i)
		if err := setup(ns); err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		b.StartTimer()
		err := measured(ns)
		b.StopTimer()
		times = append(times, time.Since(start))
		del()
		if err != nil {
			b.Fatal(err)
		}
	}
	slices.Sort(times)
	b.ReportMetric(float64(times[len(times)/2].Microseconds())/1000, "ms-median")
}
