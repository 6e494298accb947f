// Command xdsproxycmd runs the agent's xDS proxy alone, plaintext, for the
// e2e benchmark: it measures the proxy's own resident memory, apart from
// the test's control plane and clients.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/agent/xdsproxy"
)

func main() {
	socket := flag.String("socket", "", "unix socket to serve")
	upstream := flag.String("upstream", "", "control plane host:port (plaintext)")
	flag.Parse()
	p, err := xdsproxy.New(xdsproxy.Config{SocketPath: *socket, DiscoveryAddress: *upstream, Plaintext: true}, zap.NewNop())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := p.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
