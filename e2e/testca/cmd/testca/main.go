// Command testca runs the test mesh CA (package testca) as a process, for
// end-to-end tests and manual runs against the agent.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/outrigger-mesh/outrigger/e2e/testca"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "testca:", err)
		os.Exit(1)
	}
}

func run() error {
	addr := flag.String("addr", "127.0.0.1:15012", "listen address (host:port)")
	useTLS := flag.Bool("tls", true, "serve TLS with a certificate signed by the root")
	sans := flag.String("san", "localhost,127.0.0.1,istiod.istio-system.svc", "comma-separated DNS names/IPs of the serving certificate")
	token := flag.String("token", "", "required bearer token (empty: accept any)")
	rootOut := flag.String("root-out", "", "write the root certificate (PEM) to this file")
	ttl := flag.Duration("default-ttl", 24*time.Hour, "certificate lifetime when the request asks for none")
	rootsApart := flag.Bool("roots-apart", false, "send roots in root_cert instead of as the last cert_chain entry")
	flag.Parse()

	ca, err := testca.New(testca.Config{
		Addr: *addr, TLS: *useTLS, ServerSANs: strings.Split(*sans, ","),
		Token: *token, DefaultTTL: *ttl, RootsApart: *rootsApart,
	})
	if err != nil {
		return err
	}
	if *rootOut != "" {
		if err := ca.WriteRoot(*rootOut); err != nil {
			return fmt.Errorf("write root: %w", err)
		}
	}
	if err := ca.Start(); err != nil {
		return err
	}
	defer ca.Stop()
	fmt.Printf("testca listening on %s (tls=%v)\n", ca.Addr(), *useTLS)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	return nil
}
