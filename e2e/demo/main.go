// Command demo runs one pod's life in throw-away network namespaces and
// narrates it: what happened, how long it took, what to look at. It is what
// `make demo` runs. It needs root, iproute2 and iptables, cleans up after
// itself (also on Ctrl-C) and exits non-zero if any step failed. The same
// binary serves the helper modes the steps run inside the namespaces.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/outrigger-mesh/outrigger/e2e/podlife"
)

func main() {
	if len(os.Args) > 1 {
		if code, ok := podlife.ToolMain(os.Args[1], os.Args[2:]); ok {
			os.Exit(code)
		}
	}
	os.Exit(run())
}

func run() int {
	binDir := flag.String("bin", "bin", "directory with outrigger, envoysim, controlplane and testca")
	envoy := flag.String("envoy", "", "Envoy binary for the sidecar (default: envoy on PATH, else envoysim)")
	verbose := flag.Bool("v", false, "show the output of every process")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: needs root (network namespaces and iptables); run: sudo make demo")
		return 1
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		return 1
	}
	bin := podlife.Binaries{
		Outrigger:    filepath.Join(*binDir, "outrigger"),
		Envoy:        *envoy,
		ControlPlane: filepath.Join(*binDir, "controlplane"),
		CA:           filepath.Join(*binDir, "testca"),
		Tool:         self,
	}
	if bin.Envoy == "" {
		bin.Envoy = filepath.Join(*binDir, "envoysim")
		if real, err := exec.LookPath("envoy"); err == nil {
			bin.Envoy = real
		}
	}
	for _, b := range []*string{&bin.Outrigger, &bin.Envoy, &bin.ControlPlane, &bin.CA} {
		if *b, err = filepath.Abs(*b); err != nil {
			fmt.Fprintf(os.Stderr, "demo: %v\n", err)
			return 1
		}
	}
	var log io.Writer = io.Discard
	if *verbose {
		log = os.Stdout
	}
	pod, err := podlife.New(bin, log)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		return 1
	}
	defer pod.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	say("Outrigger demo: one pod's life. Pod namespace %s (%s), peer namespace %s (%s) standing for the cluster.",
		pod.NS("pod"), podlife.PodIP, pod.NS("peer"), podlife.PeerIP)
	say("Envoy: %s", bin.Envoy)

	type result struct {
		name string
		took time.Duration
		err  error
	}
	var results []result
	failed := false
	for i, s := range pod.Lifecycle() {
		if ctx.Err() != nil {
			results = append(results, result{name: s.Name, err: errors.New("interrupted")})
			failed = true
			break
		}
		say("\n[%d] %s", i+1, s.Name)
		start := time.Now()
		detail, err := s.Run(ctx)
		r := result{name: s.Name, took: time.Since(start), err: err}
		results = append(results, r)
		if err != nil {
			say("    FAILED after %s: %v", r.took.Round(time.Millisecond), err)
			failed = true
			break
		}
		say("    ok in %s: %s", r.took.Round(time.Millisecond), detail)
	}

	fmt.Println("\nSummary")
	tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  #\tstep\tresult\ttime")
	for i, r := range results {
		status := "ok"
		if r.err != nil {
			status = "FAILED"
		}
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%s\n", i+1, r.name, status, r.took.Round(time.Millisecond))
	}
	tw.Flush()
	if failed {
		return 1
	}
	return 0
}

func say(format string, args ...any) {
	fmt.Printf(format+"\n", args...)
}
