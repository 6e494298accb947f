package podlife

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Step is one narrated, checked step of a pod's life.
type Step struct {
	Name string
	// Run does the step and returns what to look at, or why it failed.
	Run func(ctx context.Context) (string, error)
}

// injectedInitArgs are the arguments Istio's injector gives the istio-init
// container by default.
var injectedInitArgs = []string{
	"istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
	"-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:warn",
}

const (
	terminationDrain = 2 * time.Second
	caToken          = "demo-token"
)

// Start is the beginning of every life: namespaces, capture, the mesh's
// servers, and the sidecar up and ready.
func (p *Pod) Start() []Step {
	return []Step{
		{"create the pod and peer network namespaces", p.setup},
		{"init container: outrigger istio-iptables (injector flags, DNS capture on)", p.initCapture},
		{"init container runs again (pod restart): nothing changes", p.initRerun},
		{"the mesh around the pod: control plane, CA and a service on the peer", p.startMesh},
		{"sidecar: outrigger proxy sidecar starts Envoy; the app waits (outrigger wait) until it is ready", p.startSidecar},
	}
}

// Lifecycle is the whole life of a pod, from start to a clean namespace.
func (p *Pod) Lifecycle() []Step {
	return append(p.Start(),
		Step{"workload certificate issued by the mesh CA, held for Envoy's SDS requests", p.certificate},
		Step{"app resolves a mesh name through the DNS proxy (captured port 53)", p.resolve},
		Step{"app calls the service: captured on 15001, sent on to its original destination", p.call},
		Step{"a client outside calls the app: captured on 15006, delivered from 127.0.0.6", p.inbound},
		Step{"kubelet probes 15021 from outside the pod; lifecycle endpoints refuse it", p.probeFromPeer},
		Step{"control plane restarts: the pod keeps working and reconnects", p.controlPlaneRestart},
		Step{"SIGTERM: readiness 503 at once, Envoy drains, everything exits 0", p.terminate},
		Step{"cleanup: outrigger istio-iptables --cleanup-only leaves the namespace as it was", p.cleanup},
	)
}

// JobLife is a Job's pod: the app ends the sidecar with /quitquitquit.
func (p *Pod) JobLife() []Step {
	return append(p.Start(),
		Step{"Job done: the app posts /quitquitquit; the agent and Envoy exit 0 at once", p.quit},
		Step{"cleanup: outrigger istio-iptables --cleanup-only leaves the namespace as it was", p.cleanup},
	)
}

// NativeSidecarLife is a native sidecar's end: preStop drains through
// /drain, then SIGTERM.
func (p *Pod) NativeSidecarLife() []Step {
	return append(p.Start(),
		Step{"preStop hook: outrigger request --debug-port=15020 POST drain; readiness turns 503", p.drainEndpoint},
		Step{"SIGTERM after the drain: everything exits 0", p.terminate},
		Step{"cleanup: outrigger istio-iptables --cleanup-only leaves the namespace as it was", p.cleanup},
	)
}

func (p *Pod) setup(ctx context.Context) (string, error) {
	pod, peer := p.NS("pod"), p.NS("peer")
	for _, ns := range []string{pod, peer} {
		if _, err := run(ctx, "ip", "netns", "add", ns); err != nil {
			return "", err
		}
		p.made = append(p.made, ns)
	}
	veth := "orv" + p.id
	cmds := [][]string{
		// No duplicate address detection: the interfaces' link-local
		// addresses settle at once, so the before/after snapshots compare
		// the capture state, not the kernel's IPv6 timing.
		{"ip", "netns", "exec", pod, "sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0"},
		{"ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"},
		{"ip", "link", "set", veth, "netns", pod},
		{"ip", "link", "set", veth + "p", "netns", peer},
		{"ip", "-n", pod, "link", "set", veth, "name", "eth0"},
		{"ip", "-n", peer, "link", "set", veth + "p", "name", "eth0"},
		{"ip", "-n", pod, "addr", "add", PodIP + "/24", "dev", "eth0"},
		{"ip", "-n", peer, "addr", "add", PeerIP + "/24", "dev", "eth0"},
		{"ip", "-n", pod, "link", "set", "eth0", "up"},
		{"ip", "-n", peer, "link", "set", "eth0", "up"},
		{"ip", "-n", pod, "link", "set", "lo", "up"},
		{"ip", "-n", peer, "link", "set", "lo", "up"},
		{"ip", "-n", pod, "route", "add", "default", "via", PeerIP},
	}
	for _, c := range cmds {
		if _, err := run(ctx, c[0], c[1:]...); err != nil {
			return "", err
		}
	}
	// The pod's resolver, as kubelet writes it: `ip netns exec` mounts it
	// over /etc/resolv.conf for everything run in the pod.
	if err := os.MkdirAll("/etc/netns/"+pod, 0o755); err != nil {
		return "", err
	}
	resolv := "nameserver " + PeerIP + "\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
	if err := os.WriteFile("/etc/netns/"+pod+"/resolv.conf", []byte(resolv), 0o644); err != nil {
		return "", err
	}
	// The agent's files, owned by the proxy's uid as in the image.
	for _, d := range []string{"bin", "etc/istio/proxy", "var/run/secrets/istio", "var/run/secrets/tokens"} {
		if err := os.MkdirAll(filepath.Join(p.dir, d), 0o755); err != nil {
			return "", err
		}
	}
	if err := os.WriteFile(filepath.Join(p.dir, "var/run/secrets/tokens/istio-token"), []byte(caToken), 0o644); err != nil {
		return "", err
	}
	// Binaries the proxy's uid runs must be reachable by it.
	for _, b := range []*string{&p.bin.Outrigger, &p.bin.Envoy} {
		dst := filepath.Join(p.dir, "bin", filepath.Base(*b))
		if err := copyFile(*b, dst); err != nil {
			return "", err
		}
		*b = dst
	}
	if _, err := run(ctx, "chown", "-R", "1337:1337", p.dir); err != nil {
		return "", err
	}
	if err := os.Chmod(p.dir, 0o755); err != nil {
		return "", err
	}
	if err := poll(ctx, 5*time.Second, func() error {
		out, err := p.InPod(ctx, "ip", "-6", "route", "show", "table", "local")
		if err != nil || !strings.Contains(out, "fe80::") {
			return fmt.Errorf("pod's IPv6 link-local address not up yet: %v", err)
		}
		return nil
	}); err != nil {
		return "", err
	}
	state, err := p.iptablesState(ctx)
	if err != nil {
		return "", err
	}
	p.initialState = state
	return fmt.Sprintf("pod %s (%s) routes via peer %s (%s); the pod's resolver is %s", pod, PodIP, peer, PeerIP, PeerIP), nil
}

func (p *Pod) initCapture(ctx context.Context) (string, error) {
	start := time.Now()
	out, err := p.InPod(ctx, "env", append([]string{"ISTIO_META_DNS_CAPTURE=true", p.bin.Outrigger}, injectedInitArgs...)...)
	if err != nil {
		return "", fmt.Errorf("%w\n%s", err, out)
	}
	took := time.Since(start)
	state, err := p.iptablesState(ctx)
	if err != nil {
		return "", err
	}
	p.appliedState = state
	if !strings.Contains(state, "ISTIO_OUTPUT_DNS") {
		return "", fmt.Errorf("no DNS capture rules applied:\n%s", state)
	}
	return fmt.Sprintf("%d rules in %s; look: ip netns exec %s iptables-save",
		strings.Count(state, "\n-A "), took.Round(time.Millisecond), p.NS("pod")), nil
}

func (p *Pod) initRerun(ctx context.Context) (string, error) {
	out, err := p.InPod(ctx, "env", append([]string{"ISTIO_META_DNS_CAPTURE=true", p.bin.Outrigger}, injectedInitArgs...)...)
	if err != nil {
		return "", fmt.Errorf("%w\n%s", err, out)
	}
	state, err := p.iptablesState(ctx)
	if err != nil {
		return "", err
	}
	if state != p.appliedState {
		return "", fmt.Errorf("rules changed on re-run:\nbefore:\n%s\nafter:\n%s", p.appliedState, state)
	}
	return "exit 0, identical rules", nil
}

func (p *Pod) startMesh(ctx context.Context) (string, error) {
	mesh := fmt.Sprintf("services:\n- name: reviews\n  namespace: default\n  vip: %s\n  ports: [{port: %s}]\n  endpoints: [{ip: %s}]\n",
		PeerIP, ServicePort, PeerIP)
	meshFile := filepath.Join(p.dir, "mesh.yaml")
	if err := os.WriteFile(meshFile, []byte(mesh), 0o644); err != nil {
		return "", err
	}
	if err := p.startControlPlane(ctx); err != nil {
		return "", err
	}
	root := filepath.Join(p.dir, "var/run/secrets/istio/root-cert.pem")
	if _, err := p.start("ca", "peer", 0, nil, p.dir, p.bin.CA, "-addr", PeerIP+":15012", "-san", PeerIP+",istiod.istio-system.svc",
		"-root-out", root, "-token", caToken); err != nil {
		return "", err
	}
	if _, err := p.start("service", "peer", 0, nil, p.dir, p.bin.Tool, "serve", PeerIP+":"+ServicePort); err != nil {
		return "", err
	}
	// The cluster's DNS server (kube-dns): it knows no mesh name.
	if _, err := p.start("kube-dns", "peer", 0, nil, p.dir, p.bin.Tool, "dns", PeerIP+":53"); err != nil {
		return "", err
	}
	for _, addr := range []string{PeerIP + ":15010", PeerIP + ":15012", PeerIP + ":" + ServicePort} {
		if err := poll(ctx, 10*time.Second, func() error {
			_, err := p.InPeer(ctx, p.bin.Tool, "dial", addr)
			return err
		}); err != nil {
			return "", fmt.Errorf("%s never accepted connections: %w", addr, err)
		}
	}
	if err := poll(ctx, 5*time.Second, func() error { _, err := os.Stat(root); return err }); err != nil {
		return "", fmt.Errorf("the CA wrote no root certificate: %w", err)
	}
	return fmt.Sprintf("control plane %s:15010 (plaintext xDS), CA %s:15012 (TLS, token), kube-dns %s:53, service %s -> %s:%s",
		PeerIP, PeerIP, PeerIP, ServiceHost, PeerIP, ServicePort), nil
}

func (p *Pod) startControlPlane(ctx context.Context) error {
	_, err := p.start("controlplane", "peer", 0, nil, p.dir, p.bin.ControlPlane, "--addr", PeerIP+":15010",
		"--mesh", filepath.Join(p.dir, "mesh.yaml"))
	return err
}

// agentEnv is the sidecar's environment as the injection template sets it.
func (p *Pod) agentEnv() []string {
	proxyConfig := fmt.Sprintf(`{"binaryPath":%q,"discoveryAddress":"%s:15010","controlPlaneAuthPolicy":"NONE","terminationDrainDuration":"%s"}`,
		p.bin.Envoy, PeerIP, terminationDrain)
	return []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"POD_NAME=reviews-client-7d9f", "POD_NAMESPACE=default", "INSTANCE_IP=" + PodIP,
		"SERVICE_ACCOUNT=client", "HOST_IP=" + PeerIP, "ISTIO_META_DNS_CAPTURE=true",
		"CA_ADDR=" + PeerIP + ":15012", "PROXY_CONFIG=" + proxyConfig,
	}
}

func (p *Pod) startSidecar(ctx context.Context) (string, error) {
	start := time.Now()
	if _, err := p.start("sidecar", "pod", 1337, p.agentEnv(), p.dir, p.bin.Outrigger, "proxy", "sidecar",
		"--domain", "default.svc.cluster.local", "--proxyLogLevel=warning", "--log_output_level=default:info"); err != nil {
		return "", err
	}
	// The app container's postStart hook (holdApplicationUntilProxyStarts).
	out, err := p.InPod(ctx, p.bin.Outrigger, "wait", "--timeoutSeconds", "30")
	if err != nil {
		return "", fmt.Errorf("%w\n%s\nagent output:\n%s", err, out, p.output("sidecar"))
	}
	return fmt.Sprintf("ready %s after exec (GET localhost:15021/healthz/ready = 200); Envoy pid %s",
		time.Since(start).Round(time.Millisecond), p.envoyPIDs(ctx)), nil
}

func (p *Pod) certificate(ctx context.Context) (string, error) {
	var expiry float64
	err := poll(ctx, 20*time.Second, func() error {
		m, err := p.metrics(ctx)
		if err != nil {
			return err
		}
		expiry = metricValue(m, `istio_agent_cert_expiry_seconds{resource_name="default"}`)
		if expiry <= 0 {
			return errors.New("no workload certificate served yet (istio_agent_cert_expiry_seconds is 0)")
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("spiffe://cluster.local/ns/default/sa/client, expires in %s (istio_agent_cert_expiry_seconds); Envoy gets it from ./var/run/secrets/workload-spiffe-uds/socket",
		(time.Duration(expiry) * time.Second).Round(time.Minute)), nil
}

func (p *Pod) resolve(ctx context.Context) (string, error) {
	var got []string
	for _, name := range []string{ServiceHost, "reviews"} {
		out, err := p.InPod(ctx, "getent", "hosts", name)
		if err != nil {
			return "", fmt.Errorf("getent hosts %s: %w", name, err)
		}
		if !strings.Contains(out, PeerIP) {
			return "", fmt.Errorf("getent hosts %s = %q, want %s", name, strings.TrimSpace(out), PeerIP)
		}
		got = append(got, name+" -> "+PeerIP)
	}
	return strings.Join(got, ", ") + " (answered by the agent on 15053; look: curl localhost:15020/debug/ndsz in the pod)", nil
}

func (p *Pod) call(ctx context.Context) (string, error) {
	out, err := p.InPod(ctx, p.bin.Tool, "call", ServiceHost+":"+ServicePort)
	if err != nil {
		return "", err
	}
	reply := strings.TrimSpace(out)
	if !strings.HasPrefix(reply, "hello from "+PeerIP) {
		return "", fmt.Errorf("unexpected reply %q", reply)
	}
	line, err := p.waitAccessLog(ctx, "outbound", PeerIP+":"+ServicePort)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("service answered %q; Envoy's access log: %s", reply, line), nil
}

func (p *Pod) inbound(ctx context.Context) (string, error) {
	if p.proc("app") == nil {
		if _, err := p.start("app", "pod", 0, nil, p.dir, p.bin.Tool, "serve", PodIP+":"+AppPort); err != nil {
			return "", err
		}
	}
	var reply string
	if err := poll(ctx, 5*time.Second, func() error {
		out, err := p.InPeer(ctx, p.bin.Tool, "call", PodIP+":"+AppPort)
		reply = strings.TrimSpace(out)
		return err
	}); err != nil {
		return "", err
	}
	// The app sees Envoy's inbound passthrough, not the client: proof the
	// connection went through 15006.
	if !strings.Contains(reply, "you are 127.0.0.6:") {
		return "", fmt.Errorf("the app answered %q: the connection did not come through Envoy's inbound listener", reply)
	}
	line, err := p.waitAccessLog(ctx, "inbound", PodIP+":"+AppPort)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("app answered %q; Envoy's access log: %s", reply, line), nil
}

// waitAccessLog waits for envoysim's access-log line of a connection in
// direction to dest (written when the connection closes). A real Envoy
// logs nowhere the demo reads, so then there is nothing to wait for.
func (p *Pod) waitAccessLog(ctx context.Context, direction, dest string) (string, error) {
	if filepath.Base(p.bin.Envoy) != "envoysim" {
		return "(real Envoy: see its admin /stats)", nil
	}
	var line string
	err := poll(ctx, 5*time.Second, func() error {
		if line = p.accessLogLine(direction, dest); line == "" {
			return fmt.Errorf("Envoy logged no %s connection to %s", direction, dest)
		}
		return nil
	})
	return line, err
}

// accessLogLine is Envoy's access-log line for a connection in direction
// to dest, or "" if there is none (a real Envoy logs elsewhere).
func (p *Pod) accessLogLine(direction, dest string) string {
	for _, l := range strings.Split(p.output("sidecar"), "\n") {
		if strings.Contains(l, direction) && strings.Contains(l, "-> "+dest) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

func (p *Pod) probeFromPeer(ctx context.Context) (string, error) {
	ready, err := p.InPeer(ctx, p.bin.Tool, "get", "http://"+PodIP+":15021/healthz/ready")
	if err != nil {
		return "", err
	}
	if ready != "200\n" {
		return "", fmt.Errorf("kubelet's probe got %q, want 200", ready)
	}
	quit, err := p.InPeer(ctx, p.bin.Tool, "post", "http://"+PodIP+":15020/quitquitquit")
	if err != nil {
		return "", err
	}
	if quit != "403\n" {
		return "", fmt.Errorf("POST /quitquitquit from outside the pod got %q, want 403", quit)
	}
	return "GET " + PodIP + ":15021/healthz/ready = 200; POST " + PodIP + ":15020/quitquitquit from the peer = 403", nil
}

func (p *Pod) controlPlaneRestart(ctx context.Context) (string, error) {
	if _, _, err := p.stop("controlplane", syscall.SIGKILL, 5*time.Second); err != nil {
		return "", err
	}
	if err := poll(ctx, 10*time.Second, func() error {
		m, err := p.metrics(ctx)
		if err != nil {
			return err
		}
		if metricValue(m, "istio_agent_xds_proxy_upstream_connected") != 0 {
			return errors.New("agent still reports an upstream connection")
		}
		return nil
	}); err != nil {
		return "", err
	}
	// During the outage: still ready, still resolving, still calling.
	if ready, err := p.InPeer(ctx, p.bin.Tool, "get", "http://"+PodIP+":15021/healthz/ready"); err != nil || ready != "200\n" {
		return "", fmt.Errorf("readiness during the outage: %q %v", ready, err)
	}
	if _, err := p.resolve(ctx); err != nil {
		return "", fmt.Errorf("DNS during the outage: %w", err)
	}
	if _, err := p.InPod(ctx, p.bin.Tool, "call", ServiceHost+":"+ServicePort); err != nil {
		return "", fmt.Errorf("call during the outage: %w", err)
	}
	down := time.Now()
	if err := p.startControlPlane(ctx); err != nil {
		return "", err
	}
	if err := poll(ctx, 20*time.Second, func() error {
		m, err := p.metrics(ctx)
		if err != nil {
			return err
		}
		if metricValue(m, "istio_agent_xds_proxy_upstream_connected") != 1 {
			return errors.New("agent has not reconnected to the control plane")
		}
		return nil
	}); err != nil {
		return "", err
	}
	return fmt.Sprintf("during the outage: ready, DNS and calls kept working; reconnected %s after the control plane came back",
		time.Since(down).Round(time.Millisecond)), nil
}

func (p *Pod) terminate(ctx context.Context) (string, error) {
	envoys := p.envoyPIDs(ctx)
	pr := p.proc("sidecar")
	if pr == nil {
		return "", errors.New("sidecar is not running")
	}
	start := time.Now()
	_ = pr.cmd.Process.Signal(syscall.SIGTERM)
	// Readiness must fail at once, long before the drain ends.
	var notReadyAfter time.Duration
	if err := poll(ctx, terminationDrain, func() error {
		code, err := p.InPeer(ctx, p.bin.Tool, "get", "http://"+PodIP+":15021/healthz/ready")
		switch {
		case err != nil && strings.Contains(err.Error(), "connection refused"):
			// Already drained (/drain): the agent stops at once, and a
			// closed port fails kubelet's probe as surely as a 503. While
			// the agent still runs, it must answer.
			select {
			case <-pr.done:
			default:
				return fmt.Errorf("readiness port closed while the agent is still draining: %w", err)
			}
		case err != nil:
			return err
		case code != "503\n":
			return fmt.Errorf("readiness %q after SIGTERM, want 503", strings.TrimSpace(code))
		}
		notReadyAfter = time.Since(start)
		return nil
	}); err != nil {
		return "", err
	}
	code, err := p.waitExit("sidecar", terminationDrain+15*time.Second)
	if err != nil {
		return "", err
	}
	took := time.Since(start)
	if code != 0 {
		return "", fmt.Errorf("agent exited %d, want 0\n%s", code, p.output("sidecar"))
	}
	if left := p.envoyPIDs(ctx); left != "none" {
		return "", fmt.Errorf("Envoy still running after the agent exited: pid %s", left)
	}
	return fmt.Sprintf("readiness 503 after %s; agent exited 0 after %s (terminationDrainDuration %s); Envoy (pid %s) gone",
		notReadyAfter.Round(time.Millisecond), took.Round(time.Millisecond), terminationDrain, envoys), nil
}

func (p *Pod) quit(ctx context.Context) (string, error) {
	start := time.Now()
	code, err := p.InPod(ctx, p.bin.Tool, "post", "http://127.0.0.1:15020/quitquitquit")
	if err != nil {
		return "", err
	}
	if code != "200\n" {
		return "", fmt.Errorf("POST /quitquitquit from the app got %q, want 200", code)
	}
	exit, err := p.waitExit("sidecar", terminationDrain)
	if err != nil {
		return "", fmt.Errorf("%w (it must not wait for a drain)", err)
	}
	if exit != 0 {
		return "", fmt.Errorf("agent exited %d, want 0", exit)
	}
	if left := p.envoyPIDs(ctx); left != "none" {
		return "", fmt.Errorf("Envoy still running: pid %s", left)
	}
	return fmt.Sprintf("agent and Envoy exited 0 %s after the request", time.Since(start).Round(time.Millisecond)), nil
}

func (p *Pod) drainEndpoint(ctx context.Context) (string, error) {
	out, err := p.InPod(ctx, p.bin.Outrigger, "request", "--debug-port=15020", "POST", "drain")
	if err != nil {
		return "", fmt.Errorf("%w: %s", err, out)
	}
	code, err := p.InPeer(ctx, p.bin.Tool, "get", "http://"+PodIP+":15021/healthz/ready")
	if err != nil {
		return "", err
	}
	if code != "503\n" {
		return "", fmt.Errorf("readiness after /drain = %q, want 503", strings.TrimSpace(code))
	}
	if p.proc("sidecar") == nil {
		return "", errors.New("the agent exited on /drain; it must keep running until SIGTERM")
	}
	return "readiness 503, Envoy draining, agent still running until SIGTERM", nil
}

func (p *Pod) cleanup(ctx context.Context) (string, error) {
	for _, name := range []string{"controlplane", "ca", "service", "kube-dns", "app"} {
		if p.proc(name) != nil {
			_, _, _ = p.stop(name, syscall.SIGTERM, 5*time.Second)
		}
	}
	args := append(append([]string{}, injectedInitArgs...), "--cleanup-only")
	if out, err := p.InPod(ctx, "env", append([]string{"ISTIO_META_DNS_CAPTURE=true", p.bin.Outrigger}, args...)...); err != nil {
		return "", fmt.Errorf("%w\n%s", err, out)
	}
	state, err := p.iptablesState(ctx)
	if err != nil {
		return "", err
	}
	if state != p.initialState {
		return "", fmt.Errorf("namespace not back to its initial state:\nbefore:\n%s\nafter:\n%s", p.initialState, state)
	}
	return "no ISTIO_* chain or jump left; iptables state equals the state before init", nil
}

// output is everything a process has printed so far.
func (p *Pod) output(name string) string {
	if pr := p.proc(name); pr != nil {
		return pr.out.String()
	}
	return ""
}

// envoyPIDs lists the running Envoy processes, or "none".
func (p *Pod) envoyPIDs(ctx context.Context) string {
	out, err := run(ctx, "pgrep", "-f", "^"+p.bin.Envoy)
	if err != nil {
		return "none"
	}
	return strings.Join(strings.Fields(out), ",")
}

// metrics scrapes the agent's merged metrics from inside the pod.
func (p *Pod) metrics(ctx context.Context) (string, error) {
	return p.InPod(ctx, p.bin.Tool, "body", "http://127.0.0.1:15020/stats/prometheus")
}

// metricValue finds "name value" in Prometheus text; -1 if absent.
func metricValue(text, name string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			v, err := strconv.ParseFloat(strings.Fields(rest)[0], 64)
			if err == nil {
				return v
			}
		}
	}
	return -1
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
