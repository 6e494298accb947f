// Command outrigger is the sidecar agent of a service mesh pod: a drop-in for
// Istio's pilot-agent. One binary serves the init container
// (outrigger istio-iptables) and the istio-proxy container
// (outrigger proxy sidecar). This is the only package that exits the process.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

// exitCodeError carries a specific process exit code up to main, for the
// commands whose exit codes are part of Istio's contract (istio-iptables
// validation exits 126).
type exitCodeError struct {
	code int
	err  error
}

func (e *exitCodeError) Error() string { return e.err.Error() }
func (e *exitCodeError) Unwrap() error { return e.err }

// withExitCode wraps err so main exits with code.
func withExitCode(code int, err error) error {
	if err == nil {
		return nil
	}
	return &exitCodeError{code: code, err: err}
}

// run executes the command line and returns the process exit code. Errors
// without a specific code exit 255, as Istio's pilot-agent does (os.Exit(-1)).
func run(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	root := newRootCmd()
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	fmt.Fprintf(os.Stderr, "Error: %v\n", err)
	var ec *exitCodeError
	if errors.As(err, &ec) {
		return ec.code
	}
	return 255
}
