// Package envoy supervises the Envoy process of a mesh pod: it builds
// Envoy's command line, starts Envoy so that it cannot outlive the agent,
// reports how Envoy ended, optionally restarts it, and on shutdown drains
// it through the admin API before stopping it. It also holds the small admin
// API client the readiness probe uses.
package envoy

import (
	"context"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// State is where the supervisor is in Envoy's life.
type State int32

// The supervisor's states. Transitions only move forward, except
// Running → Starting on a restart.
const (
	Initial  State = iota // New returned, Run not called
	Starting              // exec in progress, or waiting out a restart backoff
	Running               // Envoy is up
	Draining              // listeners drained, waiting before the stop
	Stopped               // TERM/KILL sent, waiting for the exit
	Exited                // Envoy is gone and Run has returned or is returning
)

func (s State) String() string {
	switch s {
	case Initial:
		return "initial"
	case Starting:
		return "starting"
	case Running:
		return "running"
	case Draining:
		return "draining"
	case Stopped:
		return "stopped"
	case Exited:
		return "exited"
	}
	return fmt.Sprintf("State(%d)", int32(s))
}

// Proxy supervises one Envoy. The status server uses Draining, Drain and
// Quit; cmd uses Run and SkipDrain.
type Proxy struct {
	cfg   Config
	log   *zap.Logger
	admin *Admin

	mu       sync.Mutex
	state    State
	draining bool // readiness must fail: shutdown or /drain started
	drained  bool // /drain already drained the listeners
	pid      int

	quit     chan struct{} // closed by Quit
	quitOnce sync.Once
	skip     chan struct{} // closed by SkipDrain or Quit
	skipOnce sync.Once
	restarts int
}

// New validates cfg and returns a supervisor; Run starts Envoy.
func New(cfg Config, log *zap.Logger) (*Proxy, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("envoy: %w", err)
	}
	if cfg.Stdout == nil {
		cfg.Stdout = os.Stdout
	}
	if cfg.Stderr == nil {
		cfg.Stderr = os.Stderr
	}
	if cfg.Backoff == (Backoff{}) {
		cfg.Backoff = DefaultBackoff()
	}
	return &Proxy{
		cfg:   cfg,
		log:   log.Named("envoy"),
		admin: NewAdmin(cfg.Admin),
		quit:  make(chan struct{}),
		skip:  make(chan struct{}),
	}, nil
}

// Admin returns the client of this Envoy's admin API.
func (p *Proxy) Admin() *Admin { return p.admin }

// State returns the current state.
func (p *Proxy) State() State {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state
}

// PID returns the pid of the current Envoy, or 0 if none runs.
func (p *Proxy) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// Restarts returns how many times Envoy has been restarted.
func (p *Proxy) Restarts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.restarts
}

// Draining reports whether the agent is shutting down or has drained Envoy:
// the readiness probe must fail from that moment on.
func (p *Proxy) Draining() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.draining
}

func (p *Proxy) setState(s State) {
	p.mu.Lock()
	old := p.state
	p.state = s
	if s >= Draining {
		p.draining = true
	}
	p.mu.Unlock()
	if old != s {
		p.log.Debug("state", zap.Stringer("from", old), zap.Stringer("to", s))
	}
}

// Drain drains Envoy's listeners now and keeps it running (the status
// server's POST /drain, a native sidecar's preStop hook). Readiness fails
// from here on, and the later shutdown stops Envoy without waiting again.
func (p *Proxy) Drain(ctx context.Context) error {
	p.mu.Lock()
	p.draining = true
	p.mu.Unlock()
	err := p.admin.DrainListeners(ctx, p.cfg.Type == Sidecar, true)
	if err != nil {
		return fmt.Errorf("envoy: drain: %w", err)
	}
	p.mu.Lock()
	p.drained = true
	p.mu.Unlock()
	p.log.Info("drained Envoy listeners on request; the shutdown will not wait again")
	return nil
}

// Quit stops Envoy now, without a drain wait (the status server's POST
// /quitquitquit). Run then returns nil; the caller also cancels the root
// context so the rest of the agent stops.
func (p *Proxy) Quit() {
	// Skip first: Run's shutdown checks skip as soon as it sees quit.
	p.SkipDrain()
	p.quitOnce.Do(func() { close(p.quit) })
}

// SkipDrain cuts a drain wait short (a second SIGTERM/SIGINT): Envoy is
// stopped at once.
func (p *Proxy) SkipDrain() {
	p.skipOnce.Do(func() { close(p.skip) })
}

// Run starts Envoy and supervises it until ctx ends or Quit is called, then
// drains and stops it and returns nil. If Envoy exits on its own, Run
// returns an *ExitError (also for exit code 0) unless RestartOnExit is set,
// in which case Envoy is started again after a backoff.
func (p *Proxy) Run(ctx context.Context) error {
	defer p.admin.Close()
	defer p.setState(Exited)
	if p.cfg.RemoveBootstrap {
		defer func() {
			if err := os.Remove(p.cfg.BootstrapPath); err != nil && !os.IsNotExist(err) {
				p.log.Warn("removing the bootstrap file", zap.Error(err))
			}
		}()
	}
	attempt := 0
	for {
		p.setState(Starting)
		proc, err := startProcess(newCommand(&p.cfg))
		if err != nil {
			return fmt.Errorf("envoy: start %s: %w", p.cfg.BinaryPath, err)
		}
		started := time.Now()
		p.mu.Lock()
		p.pid = proc.pid()
		p.mu.Unlock()
		p.setState(Running)
		p.log.Info("Envoy started", zap.Int("pid", proc.pid()), zap.String("binary", p.cfg.BinaryPath),
			zap.Strings("args", p.cfg.Args()))

		select {
		case <-proc.done:
		case <-ctx.Done():
			return p.shutdown(ctx, proc)
		case <-p.quit:
			return p.shutdown(ctx, proc)
		}

		// Envoy exited on its own.
		exit := proc.exitError()
		if p.cfg.OnExit != nil {
			p.cfg.OnExit(exit)
		}
		_ = proc.signalGroup(syscall.SIGKILL) // anything Envoy left behind
		p.mu.Lock()
		p.pid = 0
		p.mu.Unlock()
		if !p.cfg.RestartOnExit {
			p.logExit(exit)
			return exit
		}
		if time.Since(started) >= p.cfg.Backoff.ResetAfter {
			attempt = 0
		}
		delay := p.cfg.Backoff.delay(attempt)
		attempt++
		p.setState(Starting)
		p.log.Warn("Envoy exited; restarting it", zap.Error(exit), zap.Int("restart", attempt),
			zap.Duration("backoff", delay), zap.Duration("uptime", time.Since(started).Round(time.Millisecond)))
		t := time.NewTimer(delay)
		select {
		case <-t.C:
			p.mu.Lock()
			p.restarts++
			p.mu.Unlock()
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-p.quit:
			t.Stop()
			return nil
		}
	}
}

func (p *Proxy) logExit(e *ExitError) {
	if e.Code == 0 {
		p.log.Info("Envoy exited normally; the agent exits too", zap.Int("pid", e.PID))
		return
	}
	p.log.Error("Envoy exited with an error; the agent exits with its code", zap.Error(e), zap.Int("code", e.Code))
}

// shutdown drains Envoy, waits, stops it and waits for the exit.
func (p *Proxy) shutdown(ctx context.Context, proc *process) error {
	p.mu.Lock()
	drained := p.drained
	p.mu.Unlock()
	p.setState(Draining)
	select {
	case <-p.skip:
		p.log.Info("stopping Envoy without a drain wait")
	default:
		if drained {
			p.log.Info("Envoy was drained already; stopping it")
			break
		}
		// The root context is done; the admin calls get their own deadline.
		dctx := context.WithoutCancel(ctx)
		if err := p.admin.DrainListeners(dctx, p.cfg.Type == Sidecar, false); err != nil {
			p.log.Warn("draining Envoy listeners failed; waiting anyway", zap.Error(err))
		}
		p.waitDrain(dctx, proc)
	}
	p.setState(Stopped)
	return p.stop(proc)
}

// waitDrain waits terminationDrainDuration, or with
// ExitOnZeroActiveConnections until no connection is left, returning early
// if Envoy exits or the wait is skipped.
func (p *Proxy) waitDrain(ctx context.Context, proc *process) {
	if !p.cfg.ExitOnZeroActiveConnections {
		p.log.Info("draining Envoy", zap.Duration("terminationDrainDuration", p.cfg.TerminationDrainDuration))
		p.sleep(proc, p.cfg.TerminationDrainDuration)
		return
	}
	p.log.Info("draining Envoy until no connection is active", zap.Duration("minimumDrainDuration", p.cfg.MinimumDrainDuration))
	if !p.sleep(proc, p.cfg.MinimumDrainDuration) {
		return
	}
	const maxErrors = 5
	errs := 0
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		n, err := p.admin.ActiveConnections(ctx)
		switch {
		case err != nil:
			errs++
			p.log.Warn("reading active connections", zap.Error(err), zap.Int("failures", errs))
			if errs >= maxErrors {
				return
			}
		case n <= 0:
			if n < 0 {
				p.log.Info("Envoy reports no connection stats; stopping it")
			} else {
				p.log.Info("no active connections left; stopping Envoy")
			}
			return
		default:
			errs = 0
			p.log.Debug("waiting for active connections", zap.Int("active", n))
		}
		select {
		case <-tick.C:
		case <-proc.done:
			return
		case <-p.skip:
			return
		}
	}
}

// sleep waits d and reports true, or returns false early when Envoy exits or
// the wait is skipped.
func (p *Proxy) sleep(proc *process, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-proc.done:
		return false
	case <-p.skip:
		return false
	}
}

// stop sends SIGTERM to Envoy's process group, SIGKILL after StopGrace, and
// waits for the exit. Istio sends SIGKILL straight
// away; TERM first lets Envoy flush its access logs.
func (p *Proxy) stop(proc *process) error {
	select {
	case <-proc.done:
	default:
		if err := proc.signalGroup(syscall.SIGTERM); err != nil {
			p.log.Warn("stopping Envoy", zap.Error(err))
		}
		t := time.NewTimer(p.cfg.StopGrace)
		select {
		case <-proc.done:
		case <-t.C:
			p.log.Warn("Envoy did not exit after SIGTERM; killing it", zap.Duration("grace", p.cfg.StopGrace))
		}
		t.Stop()
	}
	// Kill the group even after Envoy exited: nothing it started may outlive
	// the agent.
	_ = proc.signalGroup(syscall.SIGKILL)
	<-proc.done
	p.mu.Lock()
	p.pid = 0
	p.mu.Unlock()
	p.log.Info("Envoy stopped", zap.String("exit", proc.exitError().Error()))
	return nil
}
