// Package bench measures the DNS proxy as a process under dnsperf load:
// queries per second, CPU microseconds per query (from /proc/<pid>/stat),
// and lost queries, against a do-nothing miekg/dns responder for
// comparison. It holds only benchmarks; `make bench` runs them.
package bench

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat
// (100 on every Linux architecture Go supports).
const clockTicks = 100

type perf struct {
	qps, cpuMicros float64
	completed      int
	lost           int
}

// BenchmarkDNSPerf runs dnsperf for DNSPERF_SECONDS (default 5) against
// outrigger dns-proxy answering name-table hits, against it answering
// cached upstream answers, and against a do-nothing responder. dnsperf
// shares the CPUs with the server, as in the reference figures.
func BenchmarkDNSPerf(b *testing.B) {
	if _, err := exec.LookPath("dnsperf"); err != nil {
		b.Skip("needs dnsperf on PATH (make deps installs it)")
	}
	if testing.Short() {
		b.Skip("runs for several seconds")
	}
	seconds := 5
	if v, err := strconv.Atoi(os.Getenv("DNSPERF_SECONDS")); err == nil && v > 0 {
		seconds = v
	}
	dir := b.TempDir()
	outrigger := os.Getenv("OUTRIGGER_BIN")
	if outrigger == "" {
		outrigger = goBuild(b, dir, "./cmd/outrigger")
	}
	responderBin := goBuild(b, dir, "./dnsproxy/bench/responder")

	table := filepath.Join(dir, "table.json")
	writeFile(b, table, `{"table": {
"productpage.ns.svc.cluster.local": {"ips": ["10.0.0.1"], "registry": "Kubernetes", "shortname": "productpage", "namespace": "ns"},
"reviews.ns.svc.cluster.local": {"ips": ["10.0.0.2", "10.0.0.3", "fd00::2"], "registry": "Kubernetes", "shortname": "reviews", "namespace": "ns"},
"api.example.com": {"ips": ["192.0.2.10"], "registry": "External"},
"*.wild.example.com": {"ips": ["192.0.2.11"], "registry": "External"}}}`)
	resolv := filepath.Join(dir, "resolv.conf")
	writeFile(b, resolv, "search ns.svc.cluster.local svc.cluster.local cluster.local\nnameserver 127.0.0.1\n")
	hits := filepath.Join(dir, "hits.txt")
	writeFile(b, hits, "productpage.ns.svc.cluster.local A\nreviews A\nreviews.ns.svc AAAA\napi.example.com A\n"+
		"api.example.com.ns.svc.cluster.local A\nx.wild.example.com A\nproductpage AAAA\n")
	var cached strings.Builder
	for i := range 100 {
		fmt.Fprintf(&cached, "host%d.example.net A\n", i)
	}
	cachedQueries := filepath.Join(dir, "cached.txt")
	writeFile(b, cachedQueries, cached.String())

	results := map[string]perf{}
	measure := func(b *testing.B, name string, run func(b *testing.B) perf) {
		p, ok := results[name]
		if !ok {
			p = run(b)
			results[name] = p
			b.Logf("%s: %.0f queries/s, %.2f µs CPU/query, %d completed, %d lost", name, p.qps, p.cpuMicros, p.completed, p.lost)
		}
		for b.Loop() {
		}
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(p.qps, "queries/s")
		b.ReportMetric(p.cpuMicros, "cpu-µs/query")
		b.ReportMetric(float64(p.lost), "lost")
	}

	b.Run("table-hits", func(b *testing.B) {
		measure(b, "table-hits", func(b *testing.B) perf {
			addr := freePort(b)
			pid := start(b, outrigger, "dns-proxy", "--name-table", table, "--listen", addr, "--resolv-conf", resolv,
				"--namespace", "ns", "--log_output_level", "default:warn")
			waitServing(b, addr, "productpage")
			return dnsperf(b, addr, hits, seconds, pid)
		})
	})
	b.Run("cached-upstream", func(b *testing.B) {
		measure(b, "cached-upstream", func(b *testing.B) perf {
			up := startResponder(b, responderBin)
			addr := freePort(b)
			pid := start(b, outrigger, "dns-proxy", "--name-table", table, "--listen", addr, "--resolv-conf", resolv,
				"--namespace", "ns", "--upstream", up, "--log_output_level", "default:warn")
			waitServing(b, addr, "productpage")
			dnsperf(b, addr, cachedQueries, 1, pid) // fill the cache
			return dnsperf(b, addr, cachedQueries, seconds, pid)
		})
	})
	b.Run("do-nothing-responder", func(b *testing.B) {
		measure(b, "do-nothing-responder", func(b *testing.B) perf {
			addr, pid := startResponderPID(b, responderBin)
			return dnsperf(b, addr, hits, seconds, pid)
		})
	})
}

func goBuild(b *testing.B, dir, pkg string) string {
	b.Helper()
	root, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		b.Fatalf("go env GOMOD: %v", err)
	}
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(root)))
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if o, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("go build %s: %v\n%s", pkg, err, o)
	}
	return out
}

func writeFile(b *testing.B, path, body string) {
	b.Helper()
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		b.Fatal(err)
	}
}

func freePort(b *testing.B) string {
	b.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().String()
}

// start runs a server process until the benchmark ends and returns its pid.
func start(b *testing.B, bin string, args ...string) int {
	b.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	})
	return cmd.Process.Pid
}

func startResponder(b *testing.B, bin string) string {
	addr, _ := startResponderPID(b, bin)
	return addr
}

// startResponderPID starts the responder on a random port and reads the
// address it prints.
func startResponderPID(b *testing.B, bin string) (string, int) {
	b.Helper()
	cmd := exec.Command(bin)
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		b.Fatalf("responder address: %v", err)
	}
	return strings.TrimSpace(line), cmd.Process.Pid
}

// waitServing waits until the server answers a query.
func waitServing(b *testing.B, addr, name string) {
	b.Helper()
	host, port, _ := net.SplitHostPort(addr)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		out, _ := exec.Command("dig", "+short", "+tries=1", "+time=1", "@"+host, "-p", port, name).Output()
		if len(strings.TrimSpace(string(out))) > 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	b.Fatalf("%s does not answer %s", addr, name)
}

func cpuTicks(b *testing.B, pid int) int {
	b.Helper()
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the parenthesised command name; utime and stime are
	// fields 14 and 15 of the whole line.
	rest := string(stat[strings.LastIndexByte(string(stat), ')')+2:])
	f := strings.Fields(rest)
	u, _ := strconv.Atoi(f[11])
	s, _ := strconv.Atoi(f[12])
	return u + s
}

var (
	reCompleted = regexp.MustCompile(`Queries completed:\s+(\d+)`)
	reLost      = regexp.MustCompile(`Queries lost:\s+(\d+)`)
	reQPS       = regexp.MustCompile(`Queries per second:\s+([\d.]+)`)
)

func dnsperf(b *testing.B, addr, queries string, seconds, pid int) perf {
	b.Helper()
	host, port, _ := net.SplitHostPort(addr)
	before := cpuTicks(b, pid)
	out, err := exec.Command("dnsperf", "-s", host, "-p", port, "-d", queries, "-l", strconv.Itoa(seconds)).CombinedOutput()
	after := cpuTicks(b, pid)
	if err != nil {
		b.Fatalf("dnsperf: %v\n%s", err, out)
	}
	var p perf
	if m := reCompleted.FindSubmatch(out); m != nil {
		p.completed, _ = strconv.Atoi(string(m[1]))
	}
	if m := reLost.FindSubmatch(out); m != nil {
		p.lost, _ = strconv.Atoi(string(m[1]))
	}
	if m := reQPS.FindSubmatch(out); m != nil {
		p.qps, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	if p.completed == 0 {
		b.Fatalf("dnsperf completed no queries:\n%s", out)
	}
	p.cpuMicros = float64(after-before) / clockTicks * 1e6 / float64(p.completed)
	return p
}
