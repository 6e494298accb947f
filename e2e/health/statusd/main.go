// Command statusd runs the status server with a stand-in Envoy admin and a
// probe target application, inside a test's pod network namespace; its get
// subcommand is the HTTP client the tests run from the other namespace.
//
//	statusd serve --app-port 8080      (config from Istio's env vars)
//	statusd get POST http://10.10.0.2:15020/quitquitquit
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/outrigger-mesh/outrigger/health"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: statusd serve [flags] | statusd get METHOD URL")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "get":
		err = get(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "statusd:", err)
		os.Exit(1)
	}
}

// get prints the status code on the first line, then the body.
func get(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("get METHOD URL")
	}
	req, err := http.NewRequest(args[0], args[1], nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Printf("%d\n%s", resp.StatusCode, body)
	return nil
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	appPort := fs.Int("app-port", 8080, "port of the probe target application (all addresses)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	log, err := zap.NewDevelopment()
	if err != nil {
		return err
	}
	cfg, err := health.ConfigFromEnv(os.LookupEnv)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, quit := context.WithCancel(ctx)
	defer quit()

	// The stand-in Envoy: live, workers started, first CDS and LDS accepted;
	// its Prometheus endpoint answers on the same port.
	admin, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	cfg.EnvoyAdminPort = uint16(admin.Addr().(*net.TCPAddr).Port)
	cfg.EnvoyPrometheusPort = cfg.EnvoyAdminPort
	adminMux := http.NewServeMux()
	adminMux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, "server.state: 0\nlistener_manager.workers_started: 1\n"+
			"cluster_manager.cds.update_success: 1\nlistener_manager.lds.update_success: 1\n")
	})
	adminMux.HandleFunc("/stats/prometheus", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, "# TYPE envoy_server_live gauge\nenvoy_server_live 1\n")
	})

	// The application: its probe answers 200 only to the probe source
	// address, so a 200 through /app-health proves the source was 127.0.0.6.
	app, err := net.Listen("tcp", fmt.Sprintf(":%d", *appPort))
	if err != nil {
		return err
	}
	appMux := http.NewServeMux()
	appMux.HandleFunc("/ready", func(w http.ResponseWriter, r *http.Request) {
		ap, _ := netip.ParseAddrPort(r.RemoteAddr)
		if ap.Addr().Unmap() != netip.MustParseAddr("127.0.0.6") {
			w.WriteHeader(http.StatusTeapot)
		}
		fmt.Fprintf(w, "from %s to %s", ap.Addr().Unmap(), r.Host)
	})

	cfg.OnQuit = quit
	cfg.OnDrain = func() { log.Info("drain requested") }
	cfg.NameTable = func() any { return map[string][]string{"db.example.com": {"10.0.0.5"}} }
	srv, err := health.New(cfg, log)
	if err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	for _, s := range []struct {
		ln net.Listener
		h  http.Handler
	}{{admin, adminMux}, {app, appMux}} {
		hs := &http.Server{Handler: s.h, ReadHeaderTimeout: 5 * time.Second}
		g.Go(func() error {
			go func() { <-gctx.Done(); hs.Close() }()
			if err := hs.Serve(s.ln); err != http.ErrServerClosed {
				return err
			}
			return nil
		})
	}
	g.Go(func() error { return srv.Run(gctx) })
	return g.Wait()
}
