// Command xdsproxycmd runs the agent's xDS proxy alone, plaintext, for the
// e2e benchmark: it measures the proxy's own resident memory, apart from
// the test's control plane and clients, and can profile it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/agent/xdsproxy"
	"github.com/outrigger-mesh/outrigger/internal/maxprocs"
	"github.com/outrigger-mesh/outrigger/internal/memlimit"
	"github.com/outrigger-mesh/outrigger/internal/memtrim"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run() error {
	socket := flag.String("socket", "", "unix socket to serve")
	upstream := flag.String("upstream", "", "control plane host:port (plaintext unless -root-ca)")
	rootCA := flag.String("root-ca", "", "TLS to the control plane, verified with this root certificate (PEM), as XDS_ROOT_CA")
	serverName := flag.String("server-name", "", "the control plane's TLS server name, as ISTIOD_SAN (default: from the address)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	memProfile := flag.String("memprofile", "", "write a heap profile (with allocations) to this file at exit")
	gcDefaults := flag.Bool("gc-defaults", true, "apply the agent's GC settings (memlimit.Apply), as proxy mode does")
	procs := flag.Bool("maxprocs", true, "apply the agent's GOMAXPROCS (maxprocs.Apply), as proxy mode does")
	trim := flag.Bool("memtrim", true, "hand start-up pages back to the kernel (memtrim.Trim) once serving, as proxy mode does")
	transport := flag.String("transport", "", "xdsproxy.Config.Transport: cut-through (default) or grpc")
	flag.Parse()
	if *gcDefaults {
		if _, err := memlimit.Apply(memlimit.Config{Getenv: os.Getenv, FS: os.DirFS("/")}); err != nil {
			return err
		}
	}
	if *procs {
		maxprocs.Apply(os.Getenv, maxprocs.Default)
	}
	p, err := xdsproxy.New(xdsproxy.Config{SocketPath: *socket, DiscoveryAddress: *upstream,
		Plaintext: *rootCA == "", RootCAPath: *rootCA, ServerName: *serverName, Transport: *transport}, zap.NewNop())
	if err != nil {
		return err
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *trim {
		go func() {
			// Once the socket is up, start-up is over.
			for ctx.Err() == nil {
				if _, err := os.Stat(*socket); err == nil {
					_, _ = memtrim.Trim()
					return
				}
				time.Sleep(time.Millisecond)
			}
		}()
	}
	if err := p.Run(ctx); err != nil {
		return err
	}
	if *memProfile != "" {
		f, err := os.Create(*memProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		runtime.GC()
		return pprof.Lookup("allocs").WriteTo(f, 0)
	}
	return nil
}
