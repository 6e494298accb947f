package xds

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/outrigger-mesh/outrigger/e2e/controlplane"
	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// BenchmarkPush3000 pushes a 3000-service CDS (about 7 MB) to a fresh ADS
// stream, directly from the control plane and through the agent's proxy
// (run as its own process, a fresh one per protocol), alternately in the
// same loop so that both see the same machine. It reports, per protocol:
//   - direct-ms and proxy-ms: the median push, and added-%: how much longer
//     the median push through the proxy takes (ns/op is the sum of one of
//     each and means little);
//   - agent-cpu-ms/op: the proxy's CPU time per push;
//   - peak-rss-MB: the proxy's peak resident memory (VmHWM).
//
// The stand-in Envoy ACKs each push, so the proxy holds the last-known-good
// CDS while the next one arrives, as it does in a pod. Pushes are spaced
// XDS_BENCH_GAP apart (default 200ms, untimed), as istiod's pushes of a
// whole mesh are (it debounces for at least 100ms): what the agent does
// after a push (compressing the accepted CDS, about 5 ms of CPU; GC) is
// over before the next push, through the proxy or direct, starts.
// XDS_BENCH_GAP=0 pushes back to back, a burst: that work then competes
// with the next push.
//
// The control plane runs as its own process (as istiod does). By default it
// is on loopback and shares the machine's cores with the proxy and the
// stand-in Envoy: every byte the proxy copies is taken from the two ends'
// CPU. XDS_BENCH_LINK=<rate> (root; e.g. 10gbit) puts it behind a shaped
// veth link instead, as istiod is from a pod (see startCPProcess).
//
// Knobs: XDS_BENCH_SERVICES (mesh size), XDS_BENCH_CP_ADDR (an external
// control plane serving such a mesh), XDS_BENCH_BIN (another relay binary
// with the same flags, for comparison), XDS_BENCH_PROXY_ARGS (e.g.
// "-transport=grpc", the fallback transport, or "-gc-defaults=false -memtrim=false" to measure
// without the agent's GC settings and start-up page trimming),
// XDS_BENCH_PROXY_ENV (environment, e.g. "GODEBUG=gctrace=1"),
// XDS_BENCH_PROFILE_DIR=<dir> (each proxy writes cpu-<name>-<mode>.pprof and
// heap-<name>-<mode>.pprof there), XDS_BENCH_DUMP=<file> (every timed push, one
// per line: mode, path, then in ms: total, first 64 KiB and last byte
// received, request at the control plane, control plane's time), and
// XDS_BENCH_VARIANT (a second proxy process, with these flags and
// environment added, e.g. "GOMAXPROCS=1" or "-transport=grpc": its pushes
// take turns with the others in the same loop and its figures are
// reported with a "variant-" prefix, so two settings are compared on the
// same machine at the same moment rather than across runs that differ by
// more than the settings do), XDS_BENCH_TLS=1 (TLS on both paths, as to istiod's port 15012: the
// stand-in Envoy's direct connections and the agent's upstream one), and
// XDS_BENCH_CP_ENV and XDS_BENCH_CP_CPUS (the control plane's environment,
// and the CPUs it may run on, for taskset: "0" with the benchmark itself
// under "taskset -c 1" gives istiod a core of its own, as it has in a
// cluster).
func BenchmarkPush3000(b *testing.B) {
	services := 3000
	if v, err := strconv.Atoi(os.Getenv("XDS_BENCH_SERVICES")); err == nil {
		services = v
	}
	var ca *controlplane.TestCA // TLS on both paths when set
	var directCreds []grpc.DialOption
	if os.Getenv("XDS_BENCH_TLS") != "" {
		var err error
		if ca, err = controlplane.NewTestCA(b.TempDir()); err != nil {
			b.Fatal(err)
		}
		directCreds = []grpc.DialOption{grpc.WithTransportCredentials(clientTLS(b, ca.RootPath))}
	}
	cpAddr := os.Getenv("XDS_BENCH_CP_ADDR")
	var cp *cpTimes // nil for an external control plane
	if cpAddr == "" {
		cpAddr, cp = startCPProcess(b, services, os.Getenv("XDS_BENCH_LINK"), ca)
	}
	gap := 200 * time.Millisecond
	if v := os.Getenv("XDS_BENCH_GAP"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			b.Fatalf("XDS_BENCH_GAP: %v", err)
		}
		gap = d
	}
	bin := testenv.Build(b, "./e2e/xds/xdsproxycmd")
	if v := os.Getenv("XDS_BENCH_BIN"); v != "" {
		bin = v
	}

	for _, delta := range []bool{false, true} {
		mode := "sotw"
		if delta {
			mode = "delta"
		}
		direct := &pushPath{name: "direct", target: cpAddr, opts: directCreds}
		paths := []*pushPath{direct, startProxyProcess(b, "proxy", bin, cpAddr, mode, ca, "")}
		if v := os.Getenv("XDS_BENCH_VARIANT"); v != "" {
			paths = append(paths, startProxyProcess(b, "variant", bin, cpAddr, mode, ca, v))
		}
		b.Run(mode, func(b *testing.B) {
			for _, p := range paths { // warm-up, not timed
				push(b, p.target, delta, "warm-"+p.name+"-"+mode, services, p.opts...)
			}
			time.Sleep(gap)
			for _, p := range paths[1:] {
				p.cpu0 = cpuTime(b, p.pid)
			}
			for i := 0; b.Loop(); i++ {
				// Rotate which goes first, so none always follows
				// another's leftovers.
				for k := range paths {
					p := paths[(i+k)%len(paths)]
					p.times = append(p.times, push(b, p.target, delta, fmt.Sprintf("bench-%s-%s-%d", p.name, mode, i), services, p.opts...))
					pause(b, gap)
				}
			}
			md := median(direct.times, pushTimes.total)
			b.ReportMetric(ms(md), "direct-ms")
			if cp != nil {
				cp.fill(b, direct.times)
				b.ReportMetric(ms(median(direct.times, pushTimes.cp)), "cp-ms")
			}
			for _, p := range paths[1:] {
				prefix := ""
				if p.name != "proxy" {
					prefix = p.name + "-"
				}
				mp := median(p.times, pushTimes.total)
				b.ReportMetric(ms(mp), prefix+"proxy-ms")
				b.ReportMetric(100*float64(mp-md)/float64(md), prefix+"added-%")
				b.ReportMetric(ms(cpuTime(b, p.pid)-p.cpu0)/float64(len(p.times)), prefix+"agent-cpu-ms/op")
				b.ReportMetric(peakRSSMB(b, p.pid), prefix+"peak-rss-MB")
				if cp != nil {
					cp.fill(b, p.times)
					reportLegs(b, prefix, direct.times, p.times)
				}
			}
			dumpPushes(b, mode, paths)
		})
		for _, p := range paths[1:] {
			p.stop()
		}
	}
}

// pushPath is one way to the control plane: direct, or through a proxy
// process (pid, stop) started for the benchmark.
type pushPath struct {
	name, target string
	opts         []grpc.DialOption
	pid          int
	stop         func()
	cpu0         time.Duration
	times        []pushTimes
}

// reportLegs reports where the added time is, with the control plane's
// own time (building and marshalling the push: tens of ms, and the same
// work on either path) taken out of each push. Its spread is most of the
// spread of a push (p10 to p90 is 30 ms here), so it hides a few ms
// between two medians of totals; without it, the difference between the
// paths is what the relay does:
//   - relay-ms, relay-%: the median push less the control plane's time,
//     through the proxy against direct (relay-% of the direct median push);
//   - added-req-ms: the request's way to the control plane (the stand-in
//     Envoy's connection and request, and the agent's upstream request);
//   - added-resp-ms: the response's way back (sending, relaying, the
//     stand-in Envoy's read and decode).
func reportLegs(b *testing.B, prefix string, direct, proxy []pushTimes) {
	md := median(direct, pushTimes.total)
	relay := median(proxy, pushTimes.withoutCP) - median(direct, pushTimes.withoutCP)
	b.ReportMetric(ms(relay), prefix+"relay-ms")
	b.ReportMetric(100*float64(relay)/float64(md), prefix+"relay-%")
	b.ReportMetric(ms(median(proxy, pushTimes.request)-median(direct, pushTimes.request)), prefix+"added-req-ms")
	b.ReportMetric(ms(median(proxy, pushTimes.response)-median(direct, pushTimes.response)), prefix+"added-resp-ms")
}

// dumpPushes appends every timed push to XDS_BENCH_DUMP, if set.
func dumpPushes(b *testing.B, mode string, paths []*pushPath) {
	name := os.Getenv("XDS_BENCH_DUMP")
	if name == "" {
		return
	}
	var out bytes.Buffer
	for _, p := range paths {
		for _, t := range p.times {
			var req, cp float64 // unknown for an external control plane
			if !t.requested.IsZero() {
				req, cp = ms(t.request()), ms(t.cp())
			}
			fmt.Fprintf(&out, "%s %s %.3f %.3f %.3f %.3f %.3f\n", mode, p.name, ms(t.took), ms(t.first), ms(t.last), req, cp)
		}
	}
	f, err := os.OpenFile(name, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err == nil {
		_, err = f.Write(out.Bytes())
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		b.Fatalf("XDS_BENCH_DUMP: %v", err)
	}
}

// pause waits d, untimed.
func pause(b *testing.B, d time.Duration) {
	if d > 0 {
		b.StopTimer()
		time.Sleep(d)
		b.StartTimer()
	}
}

func median(p []pushTimes, f func(pushTimes) time.Duration) time.Duration {
	s := make([]time.Duration, len(p))
	for i := range p {
		s[i] = f(p[i])
	}
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// startCPProcess runs the test control plane as its own process, as istiod
// is, serving a generated mesh of n services, and returns its address.
//
// With link empty it listens on loopback. Otherwise (root only) it runs in
// a network namespace of its own behind a veth pair whose two directions
// are shaped to link (a tc rate such as "10gbit"): the control plane is
// across a network, as istiod is from a pod, instead of a loopback copy
// away. A relay that forwards as bytes arrive then adds little; one that
// stores each message before sending it on adds the whole message's time
// on the second hop.
func startCPProcess(b *testing.B, n int, link string, ca *controlplane.TestCA) (string, *cpTimes) {
	b.Helper()
	bin := testenv.Build(b, "./e2e/controlplane/cmd/controlplane")
	addr := "127.0.0.1:" + strconv.Itoa(freePort(b))
	argv := []string{bin, "--timing", "--generate", strconv.Itoa(n)}
	if ca != nil {
		argv = append(argv, "--tls-cert", ca.CertPath, "--tls-key", ca.KeyPath)
	}
	argv = append(argv, "--addr", addr)
	if cpus := os.Getenv("XDS_BENCH_CP_CPUS"); cpus != "" {
		testenv.RequireCommands(b, "taskset")
		argv = append([]string{"taskset", "-c", cpus}, argv...)
	}
	var cmd *exec.Cmd
	if link == "" {
		cmd = exec.Command(argv[0], argv[1:]...)
	} else {
		ns := testenv.NewNetns(b, "cp")
		testenv.RequireCommands(b, "tc")
		const hostIP, cpIP = "10.253.0.1", "10.253.0.2"
		veth := fmt.Sprintf("orb%d", os.Getpid()%100000)
		testenv.Run(b, "ip", "link", "add", veth, "type", "veth", "peer", "name", veth+"p")
		b.Cleanup(func() { _, _ = testenv.RunErr("ip", "link", "del", veth) })
		testenv.Run(b, "ip", "link", "set", veth+"p", "netns", ns.Name)
		testenv.Run(b, "ip", "addr", "add", hostIP+"/30", "dev", veth)
		testenv.Run(b, "ip", "link", "set", veth, "up")
		ns.Run(b, "ip", "addr", "add", cpIP+"/30", "dev", veth+"p")
		ns.Run(b, "ip", "link", "set", veth+"p", "up")
		// A token bucket at the link's rate each way; the burst is a
		// few packets' worth, as a switch port would allow.
		shape := []string{"qdisc", "add", "dev", "", "root", "tbf", "rate", link, "burst", "64kb", "latency", "50ms"}
		shape[3] = veth
		testenv.Run(b, "tc", shape...)
		shape[3] = veth + "p"
		ns.Run(b, "tc", shape...)
		addr = cpIP + ":15010"
		argv[len(argv)-1] = addr
		cmd = ns.Command(argv[0], argv[1:]...)
	}
	var stderr testenv.Buffer
	cmd.Stderr = &stderr
	if e := os.Getenv("XDS_BENCH_CP_ENV"); e != "" {
		cmd.Env = append(os.Environ(), strings.Fields(e)...)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	cp := &cpTimes{seen: map[string]cpTiming{}}
	read := make(chan struct{})
	go func() {
		defer close(read)
		cp.read(out)
	}()
	b.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		<-read
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return addr, cp
		}
		if time.Now().After(deadline) {
			b.Fatalf("control plane not listening on %s: %v\n%s", addr, err, stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// freePort is a loopback TCP port nothing listens on now.
func freePort(b *testing.B) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startProxyProcess runs xdsproxycmd towards upstream. stop ends it.
func startProxyProcess(b *testing.B, name, bin, upstream, mode string, ca *controlplane.TestCA, variant string) *pushPath {
	b.Helper()
	sock := filepath.Join(b.TempDir(), "XDS")
	args := []string{"-socket", sock, "-upstream", upstream}
	if ca != nil {
		args = append(args, "-root-ca", ca.RootPath, "-server-name", controlplane.IstiodSAN)
	}
	if dir := os.Getenv("XDS_BENCH_PROFILE_DIR"); dir != "" {
		args = append(args, "-cpuprofile", filepath.Join(dir, "cpu-"+name+"-"+mode+".pprof"),
			"-memprofile", filepath.Join(dir, "heap-"+name+"-"+mode+".pprof"))
	}
	args = append(args, strings.Fields(os.Getenv("XDS_BENCH_PROXY_ARGS"))...)
	env := strings.Fields(os.Getenv("XDS_BENCH_PROXY_ENV"))
	// A variant's words are flags (leading "-") or environment (NAME=v).
	for _, w := range strings.Fields(variant) {
		if strings.HasPrefix(w, "-") {
			args = append(args, w)
		} else {
			env = append(env, w)
		}
	}
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			_ = cmd.Process.Signal(os.Interrupt)
			_ = cmd.Wait()
		})
	}
	b.Cleanup(stop)
	waitFile(b, sock)
	return &pushPath{name: name, target: "unix://" + sock, pid: cmd.Process.Pid, stop: stop}
}

// clientTLS is what Envoy would use to reach istiod itself: TLS verified
// with the mesh root.
func clientTLS(b *testing.B, rootPath string) credentials.TransportCredentials {
	pem, err := os.ReadFile(rootPath)
	if err != nil {
		b.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		b.Fatalf("%s: no certificate", rootPath)
	}
	return credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: controlplane.IstiodSAN, MinVersion: tls.VersionTLS12})
}

// envoyWindow is Envoy's default HTTP/2 stream and connection window
// (256 MiB): the stand-in Envoy receives as fast as Envoy does.
const envoyWindow = 256 << 20

// push opens an ADS stream to target, subscribes to CDS, receives the
// push, ACKs it and returns how long that took.
func push(b *testing.B, target string, delta bool, node string, services int, opts ...grpc.DialOption) pushTimes {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tc := &timedConn{start: start}
	opts = append([]grpc.DialOption{grpc.WithInitialWindowSize(envoyWindow),
		grpc.WithInitialConnWindowSize(envoyWindow), grpc.WithContextDialer(tc.dial)}, opts...)
	c, err := controlplane.DialADS(ctx, target, delta, &core.Node{Id: node}, opts...)
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
	took := time.Since(start)
	tc.mu.Lock()
	pt := pushTimes{node: node, start: start, took: took, first: tc.first, last: tc.last}
	tc.mu.Unlock()
	if err := c.ACK(r, nil); err != nil {
		b.Fatal(err)
	}
	return pt
}

// cpuTime is a process's user+system CPU time so far, all threads, at the
// kernel's tick resolution (10 ms at USER_HZ 100: read it over many pushes).
func cpuTime(b *testing.B, pid int) time.Duration {
	s, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name (which may hold spaces): state is
	// field 3, utime 14 and stime 15.
	f := strings.Fields(string(s[bytes.LastIndexByte(s, ')')+1:]))
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("/proc/%d/stat: utime %q, stime %q", pid, f[11], f[12])
	}
	return time.Duration(ut+st) * (time.Second / 100)
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

// pushTimes is one push: its duration, when its first 64 KiB and its last
// bytes had arrived, and (from the control plane, cpTimes.fill) when the
// request reached the control plane and when the response was ready.
type pushTimes struct {
	node              string
	start             time.Time
	took, first, last time.Duration
	requested, ready  time.Time
}

func (p pushTimes) total() time.Duration { return p.took }

// request is the time to the control plane's receipt of the request.
func (p pushTimes) request() time.Duration { return p.requested.Sub(p.start) }

// cp is the control plane's own time: request to response ready.
func (p pushTimes) cp() time.Duration { return p.ready.Sub(p.requested) }

// response is the time from the response being ready to its being read.
func (p pushTimes) response() time.Duration { return p.took - p.ready.Sub(p.start) }

func (p pushTimes) withoutCP() time.Duration { return p.took - p.cp() }

// cpTimes collects the control plane's --timing lines by node ID.
type cpTimes struct {
	mu   sync.Mutex
	seen map[string]cpTiming
}

type cpTiming struct{ requested, ready time.Time }

func (c *cpTimes) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		// response <node> <type> <requested ns> <ready ns>
		f := strings.Fields(sc.Text())
		if len(f) != 5 || f[0] != "response" {
			continue
		}
		req, err1 := strconv.ParseInt(f[3], 10, 64)
		ready, err2 := strconv.ParseInt(f[4], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		c.mu.Lock()
		c.seen[f[1]] = cpTiming{time.Unix(0, req), time.Unix(0, ready)}
		c.mu.Unlock()
	}
}

// fill sets the control plane's times of each push. The control plane
// prints them before it sends the response, so they are there by now but
// for the reading goroutine's lag.
func (c *cpTimes) fill(b *testing.B, p []pushTimes) {
	deadline := time.Now().Add(5 * time.Second)
	for i := range p {
		for {
			c.mu.Lock()
			t, ok := c.seen[p[i].node]
			c.mu.Unlock()
			if ok {
				p[i].requested, p[i].ready = t.requested, t.ready
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("the control plane printed no timing for %s", p[i].node)
			}
			time.Sleep(time.Millisecond)
		}
	}
}

// timedConn records when the first 64 KiB of responses had arrived and
// when the last read returned.
type timedConn struct {
	net.Conn
	start       time.Time
	mu          sync.Mutex
	n           int
	first, last time.Duration
}

func (c *timedConn) dial(ctx context.Context, addr string) (net.Conn, error) {
	network := "tcp"
	if a, ok := strings.CutPrefix(addr, "unix://"); ok {
		network, addr = "unix", a
	}
	nc, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	c.Conn = nc
	return c, err
}

func (c *timedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	t := time.Since(c.start)
	c.mu.Lock()
	c.n += n
	if c.first == 0 && c.n >= 64<<10 {
		c.first = t
	}
	c.last = t
	c.mu.Unlock()
	return n, err
}
