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

	"github.com/outrigger-mesh/outrigger/e2e/controlplane"
	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// BenchmarkPush3000 pushes a 3000-service CDS (about 7 MB) to a fresh ADS
// stream, directly from the control plane and through the agent's proxy
// (run as its own process), and reports the proxy's peak resident memory
// (VmHWM) as peak-rss-MB. Compare ns/op of the two sub-benchmarks for the
// added latency.
func BenchmarkPush3000(b *testing.B) {
	cp := startCP(b, controlplane.GenerateMesh(3000))
	bin := testenv.Build(b, "./e2e/xds/xdsproxycmd")
	sock := filepath.Join(b.TempDir(), "XDS")
	cmd := exec.Command(bin, "-socket", sock, "-upstream", cp.Addr())
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}()
	waitFile(b, sock)

	for _, delta := range []bool{false, true} {
		mode := "sotw"
		if delta {
			mode = "delta"
		}
		for _, via := range []struct{ name, target string }{{"direct", cp.Addr()}, {"proxy", "unix://" + sock}} {
			b.Run(mode+"/"+via.name, func(b *testing.B) {
				for i := 0; b.Loop(); i++ {
					push(b, via.target, delta, i)
				}
				if via.name == "proxy" {
					b.ReportMetric(peakRSSMB(b, cmd.Process.Pid), "peak-rss-MB")
				}
			})
		}
	}
}

func push(b *testing.B, target string, delta bool, i int) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := controlplane.DialADS(ctx, target, delta, &core.Node{Id: "bench-" + strconv.Itoa(i)})
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
	if r.Count != 3001 {
		b.Fatalf("%d clusters", r.Count)
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
