package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
)

// waitConfig is `outrigger wait`, as Istio's `pilot-agent wait`: the
// injector's postStart hook when holdApplicationUntilProxyStarts is on.
type waitConfig struct {
	// URL is --url. Default http://localhost:15021/healthz/ready.
	URL string
	// Period is --periodMillis. Default 500ms; the first probe comes after
	// one period, as in Istio.
	Period time.Duration
	// RequestTimeout is --requestTimeoutMillis. Default 500ms.
	RequestTimeout time.Duration
	// Timeout is --timeoutSeconds. Default 60s.
	Timeout time.Duration
}

func newWaitCmd(g *globalFlags) *cobra.Command {
	var periodMillis, requestTimeoutMillis, timeoutSeconds int
	cfg := waitConfig{}
	cmd := &cobra.Command{
		Use:   "wait",
		Short: "Wait until the proxy is ready",
		Long:  "Polls the readiness URL until it answers 200 or the timeout passes (Istio's pilot-agent wait).",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			if periodMillis <= 0 || requestTimeoutMillis <= 0 || timeoutSeconds < 0 {
				return errors.New("--periodMillis and --requestTimeoutMillis must be positive, --timeoutSeconds not negative")
			}
			cfg.Period = time.Duration(periodMillis) * time.Millisecond
			cfg.RequestTimeout = time.Duration(requestTimeoutMillis) * time.Millisecond
			cfg.Timeout = time.Duration(timeoutSeconds) * time.Second
			return waitReady(cmd.Context(), cfg, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.URL, "url", "http://localhost:15021/healthz/ready", "URL to poll for readiness")
	f.IntVar(&periodMillis, "periodMillis", 500, "milliseconds between probes")
	f.IntVar(&requestTimeoutMillis, "requestTimeoutMillis", 500, "timeout of each probe in milliseconds")
	f.IntVar(&timeoutSeconds, "timeoutSeconds", 60, "seconds to wait before giving up")
	return cmd
}

// waitReady polls cfg.URL until it answers 200.
func waitReady(ctx context.Context, cfg waitConfig, log *zap.Logger) error {
	client := &http.Client{Timeout: cfg.RequestTimeout}
	defer client.CloseIdleConnections()
	log.Info(fmt.Sprintf("Waiting for Envoy proxy to be ready (timeout: %d seconds)...", int(cfg.Timeout.Seconds())))
	deadline := time.NewTimer(cfg.Timeout)
	defer deadline.Stop()
	tick := time.NewTicker(cfg.Period)
	defer tick.Stop()
	var last error
	for {
		select {
		case <-deadline.C:
			return fmt.Errorf("timeout waiting for Envoy proxy to become ready. Last error: %v", last)
		case <-ctx.Done():
			return fmt.Errorf("wait interrupted: %w (last error: %v)", context.Cause(ctx), last)
		case <-tick.C:
			if last = probeReady(ctx, client, cfg.URL); last == nil {
				log.Info("Envoy is ready!")
				return nil
			}
			log.Debug("not ready yet", zap.Error(last))
		}
	}
}

func probeReady(ctx context.Context, client *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("HTTP status code %d", resp.StatusCode)
	}
	return nil
}
