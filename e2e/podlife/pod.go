// Package podlife plays one pod's life in network namespaces: the init
// container's capture, the sidecar agent with Envoy's stand-in, the
// control plane and CA beside it, the app resolving and calling a mesh
// service, kubelet's probe, a control-plane restart, the drain and the
// cleanup. The demo (make demo) narrates it; the lifecycle test asserts it.
package podlife

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// Addresses of the two namespaces: the pod, and a peer standing for the
// rest of the cluster (istiod, the CA, the called service).
const (
	PodIP  = "10.20.0.2"
	PeerIP = "10.20.0.1"
	// ServicePort is where the peer's service listens.
	ServicePort = "8080"
	// AppPort is where the pod's own app listens.
	AppPort = "9080"
	// ServiceHost is the mesh name of that service.
	ServiceHost = "reviews.default.svc.cluster.local"
)

// Binaries are the programs a pod's life needs.
type Binaries struct {
	// Outrigger is the agent.
	Outrigger string
	// Envoy is started by the agent as Envoy (envoysim, or a real envoy).
	Envoy string
	// ControlPlane is e2e/controlplane/cmd/controlplane.
	ControlPlane string
	// CA is e2e/testca/cmd/testca.
	CA string
	// Tool is a binary with the helper modes of ToolMain (the demo binary).
	Tool string
}

var podSeq atomic.Int64

// Pod is one pod's namespaces, processes and files.
type Pod struct {
	bin  Binaries
	id   string
	dir  string // the agent's working directory ("/" in a real pod)
	made []string
	log  io.Writer

	mu    sync.Mutex
	procs map[string]*proc

	initialState, appliedState string
}

type proc struct {
	cmd  *exec.Cmd
	out  *testenv.Buffer
	done chan struct{}
	err  error
}

// New prepares a pod; nothing is created until the steps run. log receives
// the output of the processes it starts (nil discards it).
func New(bin Binaries, log io.Writer) (*Pod, error) {
	if log == nil {
		log = io.Discard
	}
	dir, err := os.MkdirTemp("", "outrigger-pod-")
	if err != nil {
		return nil, err
	}
	id := fmt.Sprintf("%d%d", os.Getpid()%100000, podSeq.Add(1))
	return &Pod{bin: bin, id: id, dir: dir, log: log, procs: map[string]*proc{}}, nil
}

// Dir is the agent's working directory ("/" in a real pod).
func (p *Pod) Dir() string { return p.dir }

// NS is the namespace name of "pod" or "peer".
func (p *Pod) NS(role string) string { return "or-" + role + "-" + p.id }

// Close stops every process and removes the namespaces and files.
func (p *Pod) Close() {
	p.mu.Lock()
	procs := p.procs
	p.procs = map[string]*proc{}
	p.mu.Unlock()
	for _, pr := range procs {
		_ = pr.cmd.Process.Kill()
		<-pr.done
	}
	for _, ns := range p.made {
		_, _ = run(context.Background(), "ip", "netns", "del", ns)
	}
	_ = os.RemoveAll("/etc/netns/" + p.NS("pod"))
	_ = os.RemoveAll(p.dir)
}

// InPod runs a command in the pod's namespace (as root, like the app).
func (p *Pod) InPod(ctx context.Context, name string, args ...string) (string, error) {
	return run(ctx, "ip", append([]string{"netns", "exec", p.NS("pod"), name}, args...)...)
}

// InPeer runs a command in the peer's namespace.
func (p *Pod) InPeer(ctx context.Context, name string, args ...string) (string, error) {
	return run(ctx, "ip", append([]string{"netns", "exec", p.NS("peer"), name}, args...)...)
}

// start runs a long-lived process in a namespace, as uid (0 = root), and
// keeps its output.
func (p *Pod) start(name, role string, uid int, env []string, dir string, argv ...string) (*proc, error) {
	args := []string{"netns", "exec", p.NS(role)}
	if uid != 0 {
		args = append(args, "setpriv", fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", uid), "--clear-groups", "--")
	}
	if env != nil {
		args = append(args, append([]string{"env", "-i"}, env...)...)
	}
	cmd := exec.Command("ip", append(args, argv...)...)
	cmd.Dir = dir
	out := &testenv.Buffer{}
	w := io.MultiWriter(out, prefixWriter(p.log, "    | "+name+": "))
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	pr := &proc{cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		pr.err = cmd.Wait()
		close(pr.done)
	}()
	p.mu.Lock()
	p.procs[name] = pr
	p.mu.Unlock()
	return pr, nil
}

func (p *Pod) proc(name string) *proc {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.procs[name]
}

// stop signals a process and waits for it; it returns the exit code and
// how long the wait took.
func (p *Pod) stop(name string, sig syscall.Signal, timeout time.Duration) (int, time.Duration, error) {
	pr := p.proc(name)
	if pr == nil {
		return 0, 0, fmt.Errorf("%s is not running", name)
	}
	start := time.Now()
	_ = pr.cmd.Process.Signal(sig)
	select {
	case <-pr.done:
	case <-time.After(timeout):
		_ = pr.cmd.Process.Kill()
		<-pr.done
		return -1, time.Since(start), fmt.Errorf("%s did not exit within %s of %s", name, timeout, sig)
	}
	p.mu.Lock()
	delete(p.procs, name)
	p.mu.Unlock()
	return pr.cmd.ProcessState.ExitCode(), time.Since(start), nil
}

// waitExit waits for a process to end by itself.
func (p *Pod) waitExit(name string, timeout time.Duration) (int, error) {
	pr := p.proc(name)
	if pr == nil {
		return 0, fmt.Errorf("%s is not running", name)
	}
	select {
	case <-pr.done:
	case <-time.After(timeout):
		return -1, fmt.Errorf("%s still running after %s", name, timeout)
	}
	p.mu.Lock()
	delete(p.procs, name)
	p.mu.Unlock()
	return pr.cmd.ProcessState.ExitCode(), nil
}

func run(ctx context.Context, name string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// poll calls fn until it returns nil or the timeout passes.
func poll(ctx context.Context, timeout time.Duration, fn func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// prefixWriter prefixes every line written to w.
func prefixWriter(w io.Writer, prefix string) io.Writer {
	if w == io.Discard {
		return w
	}
	return &prefixed{w: w, prefix: prefix}
}

type prefixed struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
	mid    bool
}

func (p *prefixed) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out bytes.Buffer
	for _, c := range b {
		if !p.mid {
			out.WriteString(p.prefix)
			p.mid = true
		}
		out.WriteByte(c)
		if c == '\n' {
			p.mid = false
		}
	}
	_, err := p.w.Write(out.Bytes())
	return len(b), err
}
