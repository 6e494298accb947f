// Package testenv gives end-to-end tests what they share: the binaries under
// test, built once per test process, and throw-away network namespaces.
package testenv

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var (
	buildMu  sync.Mutex
	built    = map[string]string{}
	buildDir string
)

// RepoRoot returns the module root (the directory holding go.mod).
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}

// Outrigger returns the path of the outrigger binary: $OUTRIGGER_BIN when set
// (make test sets it), else a fresh build.
func Outrigger(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("OUTRIGGER_BIN"); p != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return Build(t, "./cmd/outrigger")
}

// Build compiles the main package pkg (relative to the repo root, e.g.
// "./e2e/envoysim") once per test process and returns the binary's path.
func Build(t testing.TB, pkg string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[pkg]; ok {
		return p
	}
	if buildDir == "" {
		d, err := os.MkdirTemp("", "outrigger-e2e-bin-")
		if err != nil {
			t.Fatalf("temp dir: %v", err)
		}
		buildDir = d
	}
	out := filepath.Join(buildDir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = RepoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	built[pkg] = out
	return out
}

// RequireRoot skips the test unless it runs as root (namespaces, iptables).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces and iptables); run make test as root")
	}
}

// RequireCommands skips the test unless every command is on PATH. make test
// installs them; a developer machine may lack them.
func RequireCommands(t testing.TB, cmds ...string) {
	t.Helper()
	for _, c := range cmds {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("needs %s on PATH (make deps installs it)", c)
		}
	}
}

// Run runs a command and fails the test if it fails; it returns stdout.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := RunErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return out
}

// RunErr runs a command and returns stdout, or an error that includes stderr.
func RunErr(name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

var nsSeq atomic.Int64

// Netns is a network namespace made for one test and removed after it.
type Netns struct {
	Name string
}

// NewNetns creates a namespace with loopback up. The name is unique per
// process and test run.
func NewNetns(t testing.TB, prefix string) *Netns {
	t.Helper()
	RequireRoot(t)
	RequireCommands(t, "ip")
	name := fmt.Sprintf("or-%s-%d-%d", prefix, os.Getpid(), nsSeq.Add(1))
	if len(name) > 30 {
		name = name[:30]
	}
	Run(t, "ip", "netns", "add", name)
	ns := &Netns{Name: name}
	t.Cleanup(func() { _, _ = RunErr("ip", "netns", "del", name) })
	ns.Run(t, "ip", "link", "set", "lo", "up")
	return ns
}

// Path is the namespace's file, for --network-namespace style flags.
func (n *Netns) Path() string { return "/run/netns/" + n.Name }

// Run runs a command inside the namespace and fails the test on error.
func (n *Netns) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	return Run(t, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// RunErr runs a command inside the namespace.
func (n *Netns) RunErr(name string, args ...string) (string, error) {
	return RunErr("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Command returns an unstarted command that runs inside the namespace.
func (n *Netns) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Do runs fn on an OS thread inside the namespace: sockets fn opens and
// processes it starts belong to the namespace, and stay there after fn
// returns.
func (n *Netns) Do(fn func()) error {
	target, err := os.Open(n.Path())
	if err != nil {
		return err
	}
	defer target.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			done <- err
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("setns %s: %w", n.Name, err)
			return
		}
		fn()
		// Only a thread back in the test's namespace may run other
		// goroutines; one that cannot go back stays locked and ends with
		// this goroutine.
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err == nil {
			runtime.UnlockOSThread()
		}
		done <- nil
	}()
	return <-done
}

// In is Do that fails the test if the thread cannot join the namespace.
func (n *Netns) In(t testing.TB, fn func()) {
	t.Helper()
	if err := n.Do(fn); err != nil {
		t.Fatal(err)
	}
}

// Listen opens a listener inside the namespace, closed when the test ends.
func (n *Netns) Listen(t testing.TB, network, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	var lerr error
	if err := n.Do(func() { ln, lerr = net.Listen(network, addr) }); err != nil {
		t.Fatal(err)
	}
	if lerr != nil {
		t.Fatalf("listen on %s in %s: %v", addr, n.Name, lerr)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// Pair is a pod namespace and a peer namespace joined by a veth pair:
// pod eth0 has PodIP (10.10.0.2/24, fd00:10::2/64), the peer's eth0 has
// PeerIP (10.10.0.1/24, fd00:10::1/64).
type Pair struct {
	Pod, Peer       *Netns
	PodIP, PeerIP   string
	PodIP6, PeerIP6 string
}

// NewPair creates a pod and a peer namespace joined by a veth pair. With
// ipv6 false the pod has no IPv6 address (and IPv6 is disabled in it).
func NewPair(t testing.TB, prefix string, ipv6 bool) *Pair {
	t.Helper()
	p := &Pair{
		Pod: NewNetns(t, prefix+"p"), Peer: NewNetns(t, prefix+"q"),
		PodIP: "10.10.0.2", PeerIP: "10.10.0.1", PodIP6: "fd00:10::2", PeerIP6: "fd00:10::1",
	}
	veth := fmt.Sprintf("orv%d", nsSeq.Add(1))
	Run(t, "ip", "link", "add", veth, "type", "veth", "peer", "name", veth+"p")
	Run(t, "ip", "link", "set", veth, "netns", p.Pod.Name)
	Run(t, "ip", "link", "set", veth+"p", "netns", p.Peer.Name)
	p.Pod.Run(t, "ip", "link", "set", veth, "name", "eth0")
	p.Peer.Run(t, "ip", "link", "set", veth+"p", "name", "eth0")
	for _, side := range []struct {
		ns      *Netns
		ip, ip6 string
	}{{p.Pod, p.PodIP, p.PodIP6}, {p.Peer, p.PeerIP, p.PeerIP6}} {
		side.ns.Run(t, "ip", "addr", "add", side.ip+"/24", "dev", "eth0")
		if ipv6 {
			side.ns.Run(t, "ip", "-6", "addr", "add", side.ip6+"/64", "dev", "eth0", "nodad")
			// The link-local address eth0 gets when it comes up skips
			// duplicate address detection too (it took about a second).
			side.ns.Run(t, "sysctl", "-q", "-w", "net.ipv6.conf.eth0.accept_dad=0")
		} else {
			side.ns.Run(t, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
		}
		side.ns.Run(t, "ip", "link", "set", "eth0", "up")
	}
	p.Pod.Run(t, "ip", "route", "add", "default", "via", p.PeerIP)
	if ipv6 {
		// The kernel adds the link-local address's local route a moment
		// after the link comes up: wait for it, so that a test comparing
		// the namespace's state before and after a change sees only the
		// change.
		for _, ns := range []*Netns{p.Pod, p.Peer} {
			deadline := time.Now().Add(10 * time.Second)
			for !strings.Contains(ns.Run(t, "ip", "-6", "route", "show", "table", "local", "dev", "eth0"), "fe80::") {
				if time.Now().After(deadline) {
					t.Fatalf("%s: eth0 has no link-local route 10 s after coming up", ns.Name)
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
	return p
}
