// Command controlplane runs the test control plane for demos: an ADS server
// (SotW and Delta) that serves the mesh in a YAML/JSON file.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/e2e/controlplane"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "controlplane:", err)
		os.Exit(1)
	}
}

func run() error {
	addr := flag.String("addr", "127.0.0.1:15010", "listen address")
	meshPath := flag.String("mesh", "", "mesh file (YAML or JSON); empty serves an empty mesh")
	generate := flag.Int("generate", 0, "serve a generated mesh of this many services instead of --mesh")
	certPath := flag.String("tls-cert", "", "server certificate (PEM); with --tls-key serves TLS")
	keyPath := flag.String("tls-key", "", "server key (PEM)")
	token := flag.String("token", "", "bearer token every client must present (empty: none)")
	timing := flag.Bool("timing", false, "print a line per response to stdout: \"response <node> <type> <first request> <ready to send>\", times in Unix ns (for benchmarks)")
	flag.Parse()

	var mesh controlplane.Mesh
	switch {
	case *generate > 0:
		mesh = controlplane.GenerateMesh(*generate)
	case *meshPath != "":
		m, err := controlplane.LoadMesh(*meshPath)
		if err != nil {
			return err
		}
		mesh = m
	}
	log, err := zap.NewDevelopment()
	if err != nil {
		return err
	}
	cfg := controlplane.Config{Addr: *addr, Token: *token, Log: log}
	if *timing {
		var mu sync.Mutex
		cfg.OnResponse = func(t controlplane.ResponseTiming) {
			mu.Lock()
			defer mu.Unlock()
			fmt.Printf("response %s %s %d %d\n", t.NodeID, t.TypeURL, t.Requested.UnixNano(), t.Responding.UnixNano())
		}
	}
	if *certPath != "" || *keyPath != "" {
		cert, err := tls.LoadX509KeyPair(*certPath, *keyPath)
		if err != nil {
			return fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		cfg.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	srv, err := controlplane.New(cfg, mesh)
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		return err
	}
	log.Info("serving", zap.String("addr", srv.Addr()), zap.Int("services", len(mesh.Services)), zap.Bool("tls", cfg.TLS != nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	srv.Stop()
	return nil
}
