package xds

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"

	"github.com/outrigger-mesh/outrigger/e2e/controlplane"
	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// BenchmarkPush3000 pushes a 3000-service CDS (about 7 MB) to a fresh ADS
// stream, directly from the control plane and through the agent's proxy
// (run as its own process, a fresh one per mode), and reports the proxy's
// peak resident memory (VmHWM) as peak-rss-MB. Compare ns/op of the two
// sub-benchmarks for the added latency. The stand-in Envoy ACKs each push,
// so the proxy holds the last-known-good CDS while the next one arrives, as
// it does in a pod.
//
// The proxy process applies the agent's GC settings and hands its start-up
// pages back, as proxy mode does; XDS_BENCH_PROXY_ARGS="-gc-defaults=false
// -memtrim=false" measures without. XDS_BENCH_PROXY_ENV adds environment
// variables (e.g. "GOGC=100 GODEBUG=gctrace=1"). For profiling,
// XDS_BENCH_PROFILE_DIR=<dir> makes the proxy write cpu-<mode>.pprof and
// heap-<mode>.pprof there.
func BenchmarkPush3000(b *testing.B) {
	services := 3000
	if v, err := strconv.Atoi(os.Getenv("XDS_BENCH_SERVICES")); err == nil {
		services = v
	}
	cp := startCP(b, controlplane.GenerateMesh(services))
	bin := testenv.Build(b, "./e2e/xds/xdsproxycmd")

	for _, delta := range []bool{false, true} {
		mode := "sotw"
		if delta {
			mode = "delta"
		}
		sock, stop := startProxyProcess(b, bin, cp.Addr(), mode)
		for _, via := range []struct{ name, target string }{{"direct", cp.Addr()}, {"proxy", "unix://" + sock}} {
			b.Run(mode+"/"+via.name, func(b *testing.B) {
				push(b, via.target, delta, -1, services) // warm-up, not timed
				for i := 0; b.Loop(); i++ {
					push(b, via.target, delta, i, services)
				}
				if via.name == "proxy" {
					b.ReportMetric(stop(), "peak-rss-MB")
				}
			})
		}
		stop()
	}
}

// startProxyProcess runs xdsproxycmd towards upstream. stop ends it (once)
// and returns its peak RSS in MB.
func startProxyProcess(b *testing.B, bin, upstream, mode string) (sock string, stop func() float64) {
	b.Helper()
	sock = filepath.Join(b.TempDir(), "XDS")
	args := []string{"-socket", sock, "-upstream", upstream}
	if dir := os.Getenv("XDS_BENCH_PROFILE_DIR"); dir != "" {
		args = append(args, "-cpuprofile", filepath.Join(dir, "cpu-"+mode+".pprof"),
			"-memprofile", filepath.Join(dir, "heap-"+mode+".pprof"))
	}
	args = append(args, strings.Fields(os.Getenv("XDS_BENCH_PROXY_ARGS"))...)
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	if e := os.Getenv("XDS_BENCH_PROXY_ENV"); e != "" {
		cmd.Env = append(os.Environ(), strings.Fields(e)...)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	var peak float64
	done := false
	stop = func() float64 {
		if done {
			return peak
		}
		done = true
		peak = peakRSSMB(b, cmd.Process.Pid)
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		return peak
	}
	b.Cleanup(func() { stop() })
	waitFile(b, sock)
	return sock, stop
}

// envoyWindow is Envoy's default HTTP/2 stream and connection window
// (256 MiB): the stand-in Envoy receives as fast as Envoy does.
const envoyWindow = 256 << 20

func push(b *testing.B, target string, delta bool, i, services int) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := controlplane.DialADS(ctx, target, delta, &core.Node{Id: "bench-" + strconv.Itoa(i)},
		grpc.WithInitialWindowSize(envoyWindow), grpc.WithInitialConnWindowSize(envoyWindow))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if err := c.Subscribe(resource.ClusterType, nil, "", nil); err != nil {
		b.Fatal(err)
	}
	r, err := c.Recv()
	if err != nil {
		b.Fatal(err)
	}
	if r.Count < services {
		b.Fatalf("%d clusters, want one per service (%d) and the passthrough ones", r.Count, services)
	}
	if err := c.ACK(r, nil); err != nil {
		b.Fatal(err)
	}
}

// peakRSSMB reads a process's high-water resident set size.
func peakRSSMB(b *testing.B, pid int) float64 {
	s, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(s), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return float64(kb) / 1024
		}
	}
	return 0
}
