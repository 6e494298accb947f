package envoy

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap/zaptest"
)

type fakeRun struct {
	p      *Proxy
	admin  *fakeAdmin
	record string
	done   chan error
	cancel context.CancelFunc
}

// startFake runs a supervisor over the fake Envoy (this test binary) with a
// real HTTP server standing in for the admin API.
func startFake(t *testing.T, env []string, modify func(*Config)) *fakeRun {
	t.Helper()
	f := newFakeAdmin(t)
	dir := t.TempDir()
	record := filepath.Join(dir, "record")
	cfg := DefaultConfig()
	cfg.BinaryPath = os.Args[0]
	cfg.BootstrapPath = filepath.Join(dir, "envoy-rev.json")
	cfg.Admin = f.addr()
	cfg.TerminationDrainDuration = 200 * time.Millisecond
	cfg.StopGrace = 2 * time.Second
	cfg.Env = append(os.Environ(), append([]string{"ENVOY_TEST_ROLE=envoy", "FAKE_RECORD=" + record}, env...)...)
	if modify != nil {
		modify(&cfg)
	}
	p, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &fakeRun{p: p, admin: f, record: record, done: make(chan error, 1), cancel: cancel}
	go func() { r.done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		p.Quit()
		<-r.done
	})
	return r
}

func (r *fakeRun) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.done <- err
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

// starts returns the fake's record lines for its starts (pid and args).
func (r *fakeRun) lines(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(r.record)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// waitStarted waits until the fake has recorded n lines.
func (r *fakeRun) waitLines(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if l := r.lines(t); len(l) >= n && l[0] != "" {
			return l
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("fake envoy did not record %d lines: %q", n, r.lines(t))
	return nil
}

func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// A zombie has exited; it is only waiting to be reaped.
	fields := strings.Fields(string(b))
	return len(fields) > 2 && fields[2] != "Z"
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("process %d is still alive", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestExitPropagates(t *testing.T) {
	tests := []struct {
		name     string
		env      []string
		wantCode int
		wantSig  syscall.Signal
	}{
		{name: "crash", env: []string{"FAKE_EXIT_AFTER=0s", "FAKE_EXIT_CODE=3"}, wantCode: 3},
		{name: "clean", env: []string{"FAKE_EXIT_AFTER=0s", "FAKE_EXIT_CODE=0"}, wantCode: 0},
		{name: "killed", env: []string{"FAKE_KILL_SELF=1"}, wantCode: 137, wantSig: syscall.SIGKILL},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := startFake(t, tt.env, func(c *Config) { c.RemoveBootstrap = true })
			if err := os.WriteFile(r.p.cfg.BootstrapPath, []byte("{}"), 0o644); err != nil {
				t.Fatal(err)
			}
			err := r.wait(t)
			var exit *ExitError
			if !errors.As(err, &exit) {
				t.Fatalf("Run = %v, want an *ExitError", err)
			}
			if exit.Code != tt.wantCode || exit.Signal != tt.wantSig {
				t.Errorf("exit = code %d signal %v, want code %d signal %v", exit.Code, exit.Signal, tt.wantCode, tt.wantSig)
			}
			if r.p.State() != Exited {
				t.Errorf("state = %v, want exited", r.p.State())
			}
			if _, err := os.Stat(r.p.cfg.BootstrapPath); !os.IsNotExist(err) {
				t.Errorf("bootstrap file not removed: %v", err)
			}
			if got := r.admin.reqs(); len(got) != 0 {
				t.Errorf("admin requests %q on a self-exit, want none", got)
			}
		})
	}
}

func TestArgsReachEnvoy(t *testing.T) {
	r := startFake(t, nil, func(c *Config) { c.Concurrency = 2 })
	line := r.waitLines(t, 1)[0]
	_, args, _ := strings.Cut(line, " ")
	want := "[" + strings.Join(r.p.cfg.Args(), " ") + "]"
	if args != want {
		t.Errorf("envoy got args %s, want %s", args, want)
	}
}

func TestShutdownDrains(t *testing.T) {
	tests := []struct {
		name      string
		typ       ProxyType
		wantDrain string
	}{
		{name: "sidecar", typ: Sidecar, wantDrain: "POST /drain_listeners?inboundonly&graceful"},
		{name: "router", typ: Router, wantDrain: "POST /drain_listeners?graceful"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := startFake(t, []string{"FAKE_CHILD=1"}, func(c *Config) {
				c.Type = tt.typ
				c.TerminationDrainDuration = 300 * time.Millisecond
			})
			lines := r.waitLines(t, 2)
			pid, _ := strconv.Atoi(strings.Fields(lines[0])[0])
			child, _ := strconv.Atoi(strings.Fields(lines[1])[1])
			if r.p.Draining() {
				t.Fatal("Draining() before shutdown")
			}
			r.cancel()
			// Readiness must flip as soon as the shutdown starts, while
			// Envoy still runs out its drain.
			deadline := time.Now().Add(5 * time.Second)
			for !r.p.Draining() && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			if !r.p.Draining() {
				t.Fatal("Draining() stayed false after cancel")
			}
			if err := r.wait(t); err != nil {
				t.Fatalf("Run = %v, want nil on a clean shutdown", err)
			}
			if diff := cmp.Diff([]string{tt.wantDrain}, r.admin.reqs()); diff != "" {
				t.Errorf("admin requests (-want +got):\n%s", diff)
			}
			waitGone(t, pid)
			waitGone(t, child) // the process group went with Envoy
		})
	}
}

func TestShutdownKillsAfterGrace(t *testing.T) {
	r := startFake(t, []string{"FAKE_IGNORE_TERM=1"}, func(c *Config) {
		c.TerminationDrainDuration = 0
		c.StopGrace = 100 * time.Millisecond
	})
	r.waitLines(t, 1)
	r.cancel()
	if err := r.wait(t); err != nil {
		t.Fatalf("Run = %v", err)
	}
}

func TestExitOnZeroActiveConnections(t *testing.T) {
	r := startFake(t, nil, func(c *Config) {
		c.ExitOnZeroActiveConnections = true
		c.MinimumDrainDuration = 0
		c.TerminationDrainDuration = time.Hour // must not be used
	})
	r.waitLines(t, 1)
	r.admin.setStats("listener.0.0.0.0_15006.downstream_cx_active: 2\nlistener.admin.downstream_cx_active: 1\n")
	r.cancel()
	// Wait for two polls that still see connections, then let them go.
	deadline := time.Now().Add(10 * time.Second)
	for countPrefix(r.admin.reqs(), "GET /stats") < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("no stats polls: %q", r.admin.reqs())
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case err := <-r.done:
		t.Fatalf("Run returned (%v) while connections were active", err)
	default:
	}
	r.admin.setStats("listener.0.0.0.0_15006.downstream_cx_active: 0\nlistener.admin.downstream_cx_active: 1\n")
	if err := r.wait(t); err != nil {
		t.Fatalf("Run = %v", err)
	}
}

func countPrefix(reqs []string, prefix string) int {
	n := 0
	for _, r := range reqs {
		if strings.HasPrefix(r, prefix) {
			n++
		}
	}
	return n
}

func TestSkipDrain(t *testing.T) {
	r := startFake(t, nil, func(c *Config) { c.TerminationDrainDuration = time.Hour })
	r.waitLines(t, 1)
	r.cancel()
	deadline := time.Now().Add(10 * time.Second)
	for len(r.admin.reqs()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	r.p.SkipDrain()
	if err := r.wait(t); err != nil {
		t.Fatalf("Run = %v", err)
	}
}

func TestQuit(t *testing.T) {
	r := startFake(t, nil, func(c *Config) { c.TerminationDrainDuration = time.Hour })
	r.waitLines(t, 1)
	r.p.Quit()
	if err := r.wait(t); err != nil {
		t.Fatalf("Run = %v", err)
	}
	if got := r.admin.reqs(); len(got) != 0 {
		t.Errorf("admin requests %q after Quit, want none (no drain)", got)
	}
}

func TestDrainThenShutdown(t *testing.T) {
	r := startFake(t, nil, func(c *Config) { c.TerminationDrainDuration = time.Hour })
	r.waitLines(t, 1)
	if err := r.p.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !r.p.Draining() {
		t.Error("Draining() false after Drain")
	}
	if r.p.State() != Running {
		t.Errorf("state after Drain = %v, want running", r.p.State())
	}
	r.cancel()
	if err := r.wait(t); err != nil {
		t.Fatalf("Run = %v", err)
	}
	want := []string{"POST /drain_listeners?inboundonly&graceful&skip_exit"}
	if diff := cmp.Diff(want, r.admin.reqs()); diff != "" {
		t.Errorf("admin requests (-want +got):\n%s", diff)
	}
}

func TestRestartOnExit(t *testing.T) {
	var exits atomic.Int32
	r := startFake(t, []string{"FAKE_EXIT_AFTER=0s", "FAKE_EXIT_CODE=1"}, func(c *Config) {
		c.RestartOnExit = true
		c.Backoff = Backoff{Initial: 10 * time.Millisecond, Max: 40 * time.Millisecond, ResetAfter: time.Hour}
		c.OnExit = func(e *ExitError) {
			if e.Code == 1 {
				exits.Add(1)
			}
		}
	})
	lines := r.waitLines(t, 3)
	pids := map[string]bool{}
	for _, l := range lines {
		pids[strings.Fields(l)[0]] = true
	}
	if len(pids) < 3 {
		t.Errorf("want 3 distinct Envoy processes, got %q", lines)
	}
	r.cancel()
	if err := r.wait(t); err != nil {
		t.Fatalf("Run = %v, want nil", err)
	}
	if r.p.Restarts() < 2 {
		t.Errorf("Restarts() = %d, want >= 2", r.p.Restarts())
	}
	if got := int(exits.Load()); got < r.p.Restarts() {
		t.Errorf("OnExit called %d times for %d restarts", got, r.p.Restarts())
	}
}

func TestStartFails(t *testing.T) {
	cfg := DefaultConfig()
	cfg.BinaryPath = filepath.Join(t.TempDir(), "no-such-envoy")
	p, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	err = p.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "no-such-envoy") {
		t.Errorf("Run = %v, want an error naming the binary", err)
	}
}

// TestEnvoyDiesWithAgent kills a supervising process with SIGKILL (no
// chance to clean up) and checks that its Envoy dies too.
func TestEnvoyDiesWithAgent(t *testing.T) {
	record := filepath.Join(t.TempDir(), "record")
	agent := exec.Command(os.Args[0])
	agent.Env = append(os.Environ(), "ENVOY_TEST_ROLE=agent", "FAKE_RECORD="+record)
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	r := &fakeRun{record: record}
	line := r.waitLines(t, 1)[0]
	pid, _ := strconv.Atoi(strings.Fields(line)[0])
	// Let the Go runtime of the agent settle: the thread that forked Envoy
	// must survive while the agent lives.
	time.Sleep(200 * time.Millisecond)
	if !alive(pid) {
		t.Fatal("Envoy died while the agent was alive")
	}
	_ = agent.Process.Kill()
	_ = agent.Wait()
	waitGone(t, pid)
}
