package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

func TestWaitReady(t *testing.T) {
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Ready from the third probe on.
		if hits.Add(1) < 3 {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	cfg := waitConfig{URL: srv.URL, Period: 10 * time.Millisecond, RequestTimeout: time.Second, Timeout: 30 * time.Second}
	if err := waitReady(context.Background(), cfg, zaptest.NewLogger(t)); err != nil {
		t.Fatal(err)
	}
	if got := hits.Load(); got != 3 {
		t.Errorf("probes = %d, want 3", got)
	}
}

func TestWaitTimeout(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
		wantErr string
	}{
		{name: "503", handler: func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(503) },
			wantErr: "timeout waiting for Envoy proxy to become ready. Last error: HTTP status code 503"},
		// Only 200 counts, as in Istio.
		{name: "204", handler: func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(204) },
			wantErr: "Last error: HTTP status code 204"},
		{name: "slow", handler: func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
		}, wantErr: "Client.Timeout exceeded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(tt.handler)
			defer srv.Close()
			cfg := waitConfig{URL: srv.URL, Period: 10 * time.Millisecond, RequestTimeout: 50 * time.Millisecond, Timeout: 300 * time.Millisecond}
			err := waitReady(context.Background(), cfg, zaptest.NewLogger(t))
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("err = %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestWaitFirstProbeAfterOnePeriod(t *testing.T) {
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
	defer srv.Close()
	// The timeout is shorter than the period: Istio never probes then.
	cfg := waitConfig{URL: srv.URL, Period: time.Hour, RequestTimeout: time.Second, Timeout: 50 * time.Millisecond}
	if err := waitReady(context.Background(), cfg, zaptest.NewLogger(t)); err == nil {
		t.Error("want a timeout")
	}
	if hits.Load() != 0 {
		t.Errorf("probed %d times before the first period", hits.Load())
	}
}

func TestWaitCommandFlags(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"wait", "--url", srv.URL, "--periodMillis", "10", "--requestTimeoutMillis", "100", "--timeoutSeconds", "5"})
	if err := root.ExecuteContext(context.Background()); err != nil {
		t.Fatalf("wait: %v\n%s", err, out.String())
	}
}
