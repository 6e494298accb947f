// Command demo runs one pod's life in throw-away network namespaces and
// narrates it: what happened, how long it took, what to look at. It is what
// `make demo` runs. It needs root, iproute2 and iptables, cleans up after
// itself (also on Ctrl-C) and exits non-zero if any step failed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"
)

func main() {
	if len(os.Args) > 1 {
		// Helper modes, run by the demo inside a namespace.
		switch os.Args[1] {
		case "listen":
			os.Exit(listenMode(os.Args[2:]))
		case "dial":
			os.Exit(dialMode(os.Args[2:]))
		}
	}
	os.Exit(run())
}

type step struct {
	name string
	run  func(ctx context.Context) (string, error)
}

type result struct {
	name   string
	detail string
	took   time.Duration
	err    error
}

func run() int {
	bin := flag.String("outrigger", "bin/outrigger", "path of the outrigger binary")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: needs root (it creates network namespaces and iptables rules); run: sudo make demo")
		return 1
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: cannot find own binary: %v\n", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	d := &demo{outrigger: *bin, self: self, id: fmt.Sprintf("%d", os.Getpid()%100000)}
	defer d.cleanup()

	say("Outrigger demo: one pod's life in network namespaces %s (pod, %s) and %s (peer, %s)",
		d.ns("pod"), podIP, d.ns("peer"), peerIP)
	var results []result
	failed := false
	for i, s := range d.steps() {
		if ctx.Err() != nil {
			results = append(results, result{name: s.name, err: errors.New("interrupted")})
			failed = true
			break
		}
		say("\n[%d] %s", i+1, s.name)
		start := time.Now()
		detail, err := s.run(ctx)
		r := result{name: s.name, detail: detail, took: time.Since(start), err: err}
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
			status = "FAILED: " + r.err.Error()
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
