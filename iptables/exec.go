package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// runner executes the iptables and ip tools. Execute calls every runner
// method from one goroutine locked to a thread inside the target network
// namespace, so the children it forks inherit that namespace (no nsenter
// exec per command).
type runner struct {
	log *zap.Logger
}

// execError is a failed command with what it printed on stderr.
type execError struct {
	Cmd    string
	Stderr string
	Err    error
}

func (e *execError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" {
		return fmt.Sprintf("%s: %v", e.Cmd, e.Err)
	}
	return fmt.Sprintf("%s: %v: %s", e.Cmd, e.Err, msg)
}

func (e *execError) Unwrap() error { return e.Err }

// run executes name with args and stdin; it returns stdout, or an
// *execError carrying stderr.
func (r *runner) run(ctx context.Context, stdin, name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	r.log.Debug("exec", zap.String("cmd", name), zap.Strings("args", args),
		zap.Duration("took", time.Since(start)), zap.Error(err))
	if err != nil {
		return stdout.String(), &execError{Cmd: strings.Join(append([]string{name}, args...), " "), Stderr: stderr.String(), Err: err}
	}
	return stdout.String(), nil
}

// inNetns runs fn on a fresh goroutine locked to an OS thread that has
// joined the network namespace at path ("" runs fn in the current one).
// Sockets fn opens and processes it starts live in that namespace. If the
// thread cannot be moved back, it stays locked and the runtime discards it
// when the goroutine ends, so no other goroutine ever runs in the wrong
// namespace.
func inNetns(path string, fn func() error) error {
	if path == "" {
		// Locked anyway, so per-thread /proc paths stay valid during fn.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		return fn()
	}
	target, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("--network-namespace %s: %w", path, err)
	}
	defer target.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("open current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("--network-namespace %s: enter: %w", path, err)
			return
		}
		err = fn()
		if rerr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); rerr == nil {
			runtime.UnlockOSThread()
		} else {
			err = errors.Join(err, fmt.Errorf("leave network namespace %s: %w", path, rerr))
		}
		done <- err
	}()
	return <-done
}

// readNetFile reads a /proc/net file of the calling thread's namespace.
func readNetFile(name string) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/net/%s", unix.Gettid(), name))
	return string(b), err
}
