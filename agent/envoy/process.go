package envoy

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
)

// process is one running Envoy.
type process struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has been reaped
	err  error         // cmd.Wait's result, valid after done
}

// startProcess starts cmd in its own process group with SIGKILL as its
// parent-death signal.
//
// Linux delivers the parent-death signal when the *thread* that forked the
// child exits, not the process. The Go runtime may retire any thread, so a
// plain cmd.Start from a goroutine could kill Envoy at a random moment. The
// child is therefore forked and reaped from one goroutine locked to its
// thread for the child's whole life; that thread ends only after the child
// is gone (a goroutine that exits locked takes its thread with it), and if
// the agent process dies, the thread dies with it and Envoy gets SIGKILL.
func startProcess(cmd *exec.Cmd) (*process, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p := &process{cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: see above.
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

// signalGroup signals Envoy's whole process group, so anything Envoy started
// goes with it. A group that is already gone is not an error.
func (p *process) signalGroup(sig syscall.Signal) error {
	err := syscall.Kill(-p.pid(), sig)
	if err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signal envoy process group %d with %s: %w", p.pid(), sig, err)
	}
	return nil
}

// ExitError reports that Envoy exited on its own. Code is the process exit
// code, or 128+signal number when a signal ended it (the shell convention),
// so the agent can pass the truth on to the kubelet. A Code of 0 means Envoy
// exited cleanly; Run still returns it so the other parts of the agent stop.
type ExitError struct {
	Code   int
	Signal syscall.Signal // 0 unless a signal ended Envoy
	PID    int
}

func (e *ExitError) Error() string {
	switch {
	case e.Signal == syscall.SIGKILL:
		return fmt.Sprintf("envoy (pid %d) was killed by %s (it may have been OOM-killed)", e.PID, e.Signal)
	case e.Signal != 0:
		return fmt.Sprintf("envoy (pid %d) was killed by signal %s", e.PID, e.Signal)
	case e.Code == 0:
		return fmt.Sprintf("envoy (pid %d) exited cleanly", e.PID)
	}
	return fmt.Sprintf("envoy (pid %d) exited with code %d", e.PID, e.Code)
}

// exitError describes how the process ended.
func (p *process) exitError() *ExitError {
	e := &ExitError{PID: p.pid()}
	st := p.cmd.ProcessState
	if st == nil {
		e.Code = 255
		return e
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		e.Signal = ws.Signal()
		e.Code = 128 + int(ws.Signal())
		return e
	}
	e.Code = st.ExitCode()
	return e
}

// newCommand builds Envoy's exec.Cmd from the config.
func newCommand(cfg *Config) *exec.Cmd {
	cmd := exec.Command(cfg.BinaryPath, cfg.Args()...)
	cmd.Env = cfg.Env
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	cmd.Stdout, cmd.Stderr = cfg.Stdout, cfg.Stderr
	return cmd
}
