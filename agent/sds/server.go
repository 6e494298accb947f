// Package sds is the agent's Secret Discovery Service: Envoy's sds-grpc
// cluster dials its unix socket for the workload certificate ("default"), the
// mesh roots ("ROOTCA") and certificates mounted as files (file-cert:,
// file-root:). Workload certificates come from the mesh CA and are renewed
// before they expire; file certificates are watched and pushed when they
// change. The private key never leaves the process except over this socket.
package sds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"

	"github.com/outrigger-mesh/outrigger/agent/certs"
)

// Server serves SDS on a unix socket.
type Server struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer

	cfg      Config
	log      *zap.Logger
	store    *store
	metrics  *metrics
	files    *fileWatcher
	workload *workload // nil with FileMountedCerts
}

// New validates cfg and registers the metrics. Nothing is served before Run.
func New(cfg Config, log *zap.Logger) (*Server, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("sds: %w", err)
	}
	if cfg.SystemRootsFile == "" {
		for _, p := range systemRootCandidates {
			if _, err := os.Stat(p); err == nil {
				cfg.SystemRootsFile = p
				break
			}
		}
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("sds: register metrics: %w", err)
	}
	log = log.Named("sds")
	s := &Server{cfg: cfg, log: log, store: newStore(), metrics: m}
	s.files = newFileWatcher(log, s.store, m, cfg.FileDebounce, cfg.SystemRootsFile)
	if !cfg.FileMountedCerts {
		s.workload = &workload{
			cfg: cfg, log: log, store: s.store, metrics: m, rnd: defaultRand,
			id: certs.SPIFFEID(cfg.TrustDomain, cfg.Namespace, cfg.ServiceAccount),
		}
	}
	return s, nil
}

// SocketPath is where the server listens.
func (s *Server) SocketPath() string { return s.cfg.SocketPath }

// Run fetches the workload certificate (or loads the mounted files), serves
// SDS until ctx ends, and returns nil on a clean stop. Envoy may connect
// before the first certificate arrives: its requests wait.
func (s *Server) Run(ctx context.Context) error {
	lis, err := listenUnix(s.cfg.SocketPath)
	if err != nil {
		return err
	}
	defer os.Remove(s.cfg.SocketPath)
	if err := s.files.start(); err != nil {
		lis.Close()
		return err
	}

	if s.cfg.FileMountedCerts {
		// Files that are missing or wrong now are logged; they are served
		// as soon as a change makes them right.
		for _, r := range []*fileResource{
			{name: WorkloadResource, certPath: s.cfg.CertChainFile, keyPath: s.cfg.KeyFile},
			{name: RootResource, rootPath: s.cfg.RootCertFile},
		} {
			_ = s.files.add(r, false)
		}
	}

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.files.run(ctx) })
	if s.workload != nil {
		g.Go(func() error { return s.workload.run(ctx) })
	}

	gs := grpc.NewServer(grpc.MaxConcurrentStreams(100000))
	secretv3.RegisterSecretDiscoveryServiceServer(gs, s)
	g.Go(func() error {
		if err := gs.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("sds: serve %s: %w", s.cfg.SocketPath, err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		done := make(chan struct{})
		go func() { gs.GracefulStop(); close(done) }()
		t := time.NewTimer(s.cfg.ShutdownTimeout)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
			gs.Stop()
			<-done
		}
		return nil
	})
	s.log.Info("SDS server listening", zap.String("socket", s.cfg.SocketPath), zap.Bool("file_mounted_certs", s.cfg.FileMountedCerts))
	return g.Wait()
}

// listenUnix prepares the socket: the directory is created if missing, a
// stale socket from an earlier run is removed, but a live one (another
// agent, or an external SDS provider) is an error. The socket is 0666, as
// Istio: the boundary is the pod's filesystem (the socket lives on a volume
// only the pod's containers mount), and Envoy may run as a different user.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("sds: create socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("sds: %s exists and is not a socket; remove it or choose another WORKLOAD_IDENTITY_SOCKET_FILE", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("sds: another process serves %s; stop it or choose another WORKLOAD_IDENTITY_SOCKET_FILE", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("sds: remove stale socket: %w", err)
		}
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("sds: listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		lis.Close()
		return nil, fmt.Errorf("sds: chmod %s: %w", path, err)
	}
	return lis, nil
}
