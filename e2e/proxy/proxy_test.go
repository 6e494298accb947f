// Package proxy tests `outrigger proxy sidecar` end to end: the real agent
// binary supervises envoysim (the Envoy double) in a fresh network namespace,
// with a temp dir as its working directory (Istio's paths are relative).
package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/outrigger-mesh/outrigger/e2e/envoysim/controlplane"
	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

const (
	instanceIP = "10.44.0.7"
	nodeID     = "sidecar~" + instanceIP + "~app-0.demo~demo.svc.cluster.local"
)

type agent struct {
	ns     *testenv.Netns
	dir    string
	cmd    *exec.Cmd
	out    *testenv.Buffer
	done   chan struct{}
	err    error
	record string
}

// agentOpts describe one agent run.
type agentOpts struct {
	proxyConfig string            // PROXY_CONFIG without binaryPath; "" = {}
	rawConfig   string            // PROXY_CONFIG verbatim (for malformed input)
	env         map[string]string // extra env
	args        []string          // extra proxy flags
	files       map[string]string // files to create under the working dir
	ns          *testenv.Netns    // reuse a namespace
	// inboundPort, when set, starts a control plane in the namespace before
	// the agent and points the agent's xDS proxy at it (plaintext): Envoy
	// gets a TCP listener on 127.0.0.1:inboundPort through the agent, as in
	// a pod.
	inboundPort uint32
}

func startAgent(t testing.TB, o agentOpts) *agent {
	t.Helper()
	bin := testenv.Outrigger(t)
	sim := testenv.Build(t, "./e2e/envoysim")
	ns := o.ns
	if ns == nil {
		ns = testenv.NewNetns(t, "px")
	}
	dir := t.TempDir()
	for name, body := range o.files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	pc := o.rawConfig
	if pc == "" {
		extra := strings.TrimSpace(o.proxyConfig)
		if extra != "" {
			extra = ", " + extra
		}
		if o.inboundPort != 0 {
			extra += ", " + upstreamConfig(startControlPlane(t, ns, o.inboundPort))
		}
		pc = fmt.Sprintf(`{"binaryPath": %q, "concurrency": 2%s}`, sim, extra)
	}
	a := &agent{ns: ns, dir: dir, out: &testenv.Buffer{}, done: make(chan struct{}), record: filepath.Join(dir, "envoysim.record")}
	args := append([]string{"proxy", "sidecar", "--domain", "demo.svc.cluster.local", "--proxyLogLevel=warning"}, o.args...)
	a.cmd = ns.Command(bin, args...)
	a.cmd.Dir = dir
	a.cmd.Env = append(os.Environ(),
		"PROXY_CONFIG="+pc, "POD_NAME=app-0", "POD_NAMESPACE=demo", "INSTANCE_IP="+instanceIP,
		"SERVICE_ACCOUNT=default", "ENVOYSIM_RECORD="+a.record)
	for k, v := range o.env {
		a.cmd.Env = append(a.cmd.Env, k+"="+v)
	}
	a.cmd.Stdout, a.cmd.Stderr = a.out, a.out
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		a.err = a.cmd.Wait()
		close(a.done)
	}()
	t.Cleanup(func() {
		select {
		case <-a.done:
		default:
			_ = a.cmd.Process.Kill()
			<-a.done
		}
		if t.Failed() {
			t.Logf("agent output:\n%s", a.out.String())
		}
	})
	return a
}

// exitCode waits for the agent and returns its exit code.
func (a *agent) exitCode(t testing.TB, timeout time.Duration) int {
	t.Helper()
	select {
	case <-a.done:
	case <-time.After(timeout):
		t.Fatalf("agent still running after %v", timeout)
	}
	var ee *exec.ExitError
	if errors.As(a.err, &ee) {
		return ee.ExitCode()
	}
	if a.err != nil {
		t.Fatalf("agent: %v", a.err)
	}
	return 0
}

// starts returns envoysim's start records (one line per process).
func (a *agent) starts() []string {
	b, err := os.ReadFile(a.record)
	if err != nil {
		return nil
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

func (a *agent) waitStarts(t testing.TB, n int, timeout time.Duration) []string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for len(a.starts()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("envoysim started %d times, want %d", len(a.starts()), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return a.starts()
}

// dial connects to addr from inside the agent's namespace: the socket is
// created on a thread that has joined the namespace, and stays there.
func (a *agent) dial(network, addr string) (net.Conn, error) {
	var c net.Conn
	var err error
	if nserr := a.ns.Do(func() { c, err = net.DialTimeout(network, addr, 5*time.Second) }); nserr != nil {
		return nil, nserr
	}
	return c, err
}

// admin GETs Envoy's admin API in the namespace.
func (a *agent) admin(path string) (int, string, error) { return a.get(15000, path) }

// get GETs http://127.0.0.1:port/path in the namespace.
func (a *agent) get(port int, path string) (int, string, error) {
	client := &http.Client{
		Timeout: 3 * time.Second,
		Transport: &http.Transport{DisableKeepAlives: true, DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
			return a.dial(network, addr)
		}},
	}
	resp, err := client.Get("http://127.0.0.1:" + strconv.Itoa(port) + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func (a *agent) waitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, _, err := a.admin("/ready")
		if err == nil && code == http.StatusOK {
			return
		}
		select {
		case <-a.done:
			t.Fatalf("agent exited before Envoy was ready: %v", a.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("envoy not ready: %d %v", code, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startControlPlane serves, inside ns, CDS and LDS for an inbound TCP
// listener on 127.0.0.1:port, and returns the control plane's address.
func startControlPlane(t testing.TB, ns *testenv.Netns, port uint32) string {
	t.Helper()
	ln := ns.Listen(t, "tcp", "127.0.0.1:0")
	cp := controlplane.Serve(t, ln)
	cluster := fmt.Sprintf("inbound|%d||", port)
	cp.Set(t, nodeID, "1", []*clusterv3.Cluster{controlplane.Cluster(cluster)},
		[]*listenerv3.Listener{controlplane.TCPListener("virtualInbound", "127.0.0.1", port, cluster)})
	return ln.Addr().String()
}

// upstreamConfig is the PROXY_CONFIG fragment that points the agent's xDS
// proxy at a plaintext control plane on addr.
func upstreamConfig(addr string) string {
	return fmt.Sprintf(`"discoveryAddress": %q, "controlPlaneAuthPolicy": "NONE"`, addr)
}

func echo(t testing.TB, c net.Conn, msg string) error {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo = %q, want %q", buf, msg)
	}
	return nil
}

func TestReadyThenSIGTERMDrainsWithConnectionOpen(t *testing.T) {
	testenv.RequireRoot(t)
	const drain = 3 * time.Second
	a := startAgent(t, agentOpts{proxyConfig: `"terminationDrainDuration": "3s"`, inboundPort: 9080})
	a.waitStarts(t, 1, 20*time.Second)
	a.waitReady(t)
	_, stats, err := a.admin(`/stats?usedonly&filter=^(server\.state|listener_manager\.workers_started)`)
	if err != nil || stats != "listener_manager.workers_started: 1\nserver.state: 0\n" {
		t.Fatalf("live stats = %q, %v", stats, err)
	}

	c, err := a.dial("tcp", "127.0.0.1:9080")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := echo(t, c, "before"); err != nil {
		t.Fatal(err)
	}
	sigAt := time.Now()
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// The in-flight connection keeps working during the drain.
	time.Sleep(500 * time.Millisecond)
	if err := echo(t, c, "during"); err != nil {
		t.Fatalf("connection broken during the drain: %v", err)
	}
	if code := a.exitCode(t, 30*time.Second); code != 0 {
		t.Fatalf("exit code = %d, want 0", code)
	}
	if took := time.Since(sigAt); took < drain {
		t.Errorf("agent exited %v after SIGTERM, before terminationDrainDuration %v", took, drain)
	}
	// Envoy is gone, so is the connection, and the generated bootstrap.
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("connection still open after the agent exited")
	}
	if _, err := os.Stat(filepath.Join(a.dir, "etc/istio/proxy/envoy-rev.json")); !os.IsNotExist(err) {
		t.Errorf("bootstrap not removed: %v", err)
	}
	out := a.out.String()
	for _, want := range []string{"draining 1 listeners (inboundonly=true graceful=true skip_exit=false)", "Envoy stopped"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

func TestExitOnZeroActiveConnections(t *testing.T) {
	testenv.RequireRoot(t)
	a := startAgent(t, agentOpts{
		proxyConfig: `"terminationDrainDuration": "60s"`,
		env:         map[string]string{"EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true", "MINIMUM_DRAIN_DURATION": "1s"},
		inboundPort: 9080,
	})
	a.waitStarts(t, 1, 20*time.Second)
	a.waitReady(t)
	c, err := a.dial("tcp", "127.0.0.1:9080")
	if err != nil {
		t.Fatal(err)
	}
	if err := echo(t, c, "x"); err != nil {
		t.Fatal(err)
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	// The agent waits while the connection is open...
	time.Sleep(2500 * time.Millisecond)
	select {
	case <-a.done:
		t.Fatal("agent exited with a connection still active")
	default:
	}
	if err := echo(t, c, "y"); err != nil {
		t.Fatalf("connection broken during the drain: %v", err)
	}
	// ...and stops soon after it closes, long before the 60 s drain.
	c.Close()
	if code := a.exitCode(t, 20*time.Second); code != 0 {
		t.Fatalf("exit code = %d, want 0", code)
	}
}

func TestEnvoyExitCodePropagates(t *testing.T) {
	testenv.RequireRoot(t)
	tests := []struct {
		name string
		env  map[string]string
		want int
	}{
		{name: "crash", env: map[string]string{"ENVOYSIM_CRASH_AFTER": "300ms", "ENVOYSIM_EXIT_CODE": "3"}, want: 3},
		{name: "clean exit", env: map[string]string{"ENVOYSIM_CRASH_AFTER": "300ms", "ENVOYSIM_EXIT_CODE": "0"}, want: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := startAgent(t, agentOpts{env: tt.env})
			if code := a.exitCode(t, 30*time.Second); code != tt.want {
				t.Errorf("exit code = %d, want %d", code, tt.want)
			}
			if n := len(a.starts()); n != 1 {
				t.Errorf("envoysim started %d times, want 1 (no restart by default)", n)
			}
		})
	}
}

func TestRestartWithBackoff(t *testing.T) {
	testenv.RequireRoot(t)
	a := startAgent(t, agentOpts{env: map[string]string{
		"OUTRIGGER_ENVOY_RESTART": "true", "ENVOYSIM_CRASH_AFTER": "200ms", "ENVOYSIM_EXIT_CODE": "1",
	}})
	// Default backoff: ~1 s, then ~2 s between starts.
	starts := a.waitStarts(t, 3, 30*time.Second)
	pids := map[string]bool{}
	for _, s := range starts {
		pids[strings.Fields(s)[0]] = true
	}
	if len(pids) != len(starts) {
		t.Errorf("starts %q reuse a pid", starts)
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	if code := a.exitCode(t, 30*time.Second); code != 0 {
		t.Errorf("exit code = %d, want 0", code)
	}
	if got := strings.Count(a.out.String(), "Envoy exited; restarting it"); got < 2 {
		t.Errorf("restart logged %d times, want >= 2", got)
	}
}

func TestBadConfigStartsNoEnvoy(t *testing.T) {
	testenv.RequireRoot(t)
	ns := testenv.NewNetns(t, "pxb")
	tests := []struct {
		name    string
		opts    agentOpts
		wantErr string
	}{
		{name: "malformed PROXY_CONFIG", opts: agentOpts{rawConfig: `{"binaryPath": "/x", "drainDuration": [`}, wantErr: "PROXY_CONFIG"},
		{name: "bad value", opts: agentOpts{proxyConfig: `"drainDuration": "soon"`}, wantErr: "drainDuration"},
		{name: "bad log level", opts: agentOpts{args: []string{"--proxyLogLevel=loud"}}, wantErr: "--proxyLogLevel"},
		{name: "template with unknown field", opts: agentOpts{
			args:  []string{"--templateFile", "tmpl.json"},
			files: map[string]string{"tmpl.json": `{"node": {"id": "{{ .nodeID }}"}, "admin": {"adress": {}}}`},
		}, wantErr: "adress"},
		{name: "template that does not parse", opts: agentOpts{
			args:  []string{"--templateFile", "tmpl.json"},
			files: map[string]string{"tmpl.json": `{"node": {{ .nope`},
		}, wantErr: "tmpl.json"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.ns = ns
			a := startAgent(t, tt.opts)
			code := a.exitCode(t, 30*time.Second)
			if code == 0 {
				t.Errorf("exit code 0, want an error")
			}
			if out := a.out.String(); !strings.Contains(out, tt.wantErr) {
				t.Errorf("output does not name %q:\n%s", tt.wantErr, out)
			}
			if s := a.starts(); len(s) != 0 {
				t.Errorf("Envoy was started: %q", s)
			}
		})
	}
}

// A second SIGTERM cuts the drain wait short: kubelet's grace period may be
// shorter than terminationDrainDuration, and an operator's second Ctrl-C
// means "now".
func TestSecondSignalSkipsTheDrainWait(t *testing.T) {
	testenv.RequireRoot(t)
	const drain = 60 * time.Second
	a := startAgent(t, agentOpts{proxyConfig: `"terminationDrainDuration": "60s"`, inboundPort: 9080})
	a.waitStarts(t, 1, 20*time.Second)
	a.waitReady(t)
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// The drain has begun once Envoy got drain_listeners.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(a.out.String(), "draining 1 listeners") {
		if time.Now().After(deadline) {
			t.Fatal("no drain_listeners call after SIGTERM")
		}
		time.Sleep(20 * time.Millisecond)
	}
	sigAt := time.Now()
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := a.exitCode(t, drain/3); code != 0 {
		t.Fatalf("exit code = %d, want 0", code)
	}
	t.Logf("agent exited %v after the second SIGTERM", time.Since(sigAt).Round(time.Millisecond))
	if !strings.Contains(a.out.String(), "Envoy stopped") {
		t.Error("output lacks \"Envoy stopped\"")
	}
}
