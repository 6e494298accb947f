// Command grpcclient is a proxyless gRPC application for the e2e tests: it
// resolves an xds:/// target through the bootstrap in GRPC_XDS_BOOTSTRAP
// (which points at the agent's socket) and calls the gRPC health service
// there. grpc-go reads the bootstrap at init, so the variable must be set
// before this process starts.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	_ "google.golang.org/grpc/xds" // registers the xds:/// resolver and balancers
)

func main() {
	target := flag.String("target", "", "xds:///host:port")
	timeout := flag.Duration("timeout", 20*time.Second, "give up after")
	flag.Parse()
	if err := run(*target, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "grpcclient:", err)
		os.Exit(1)
	}
}

func run(target string, timeout time.Duration) error {
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return fmt.Errorf("health check via %s: %w", target, err)
	}
	fmt.Println(resp.GetStatus())
	return nil
}
