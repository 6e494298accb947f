// Package health_test runs the status server in a pod network namespace and
// talks to it from a second namespace over a veth, as kubelet and the rest
// of the cluster would.
package health_test

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// call runs "statusd get" in ns and returns the status code and body.
func call(t *testing.T, ns *testenv.Netns, bin, method, url string) (int, string) {
	t.Helper()
	out, err := ns.RunErr(bin, "get", method, url)
	if err != nil {
		t.Fatalf("%s %s from %s: %v", method, url, ns.Name, err)
	}
	first, body, _ := strings.Cut(out, "\n")
	var code int
	if _, err := fmt.Sscan(first, &code); err != nil {
		t.Fatalf("bad client output %q", out)
	}
	return code, body
}

func TestStatusServerAcrossNamespaces(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.Build(t, "./e2e/health/statusd")
	pair := testenv.NewPair(t, "hl", false)

	cmd := pair.Pod.Command(bin, "serve", "--app-port", "8080")
	cmd.Env = append(os.Environ(),
		"INSTANCE_IP="+pair.PodIP,
		`ISTIO_KUBE_APP_PROBERS={"/app-health/app/readyz":{"httpGet":{"path":"/ready","port":8080},"timeoutSeconds":2}}`,
	)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("statusd output:\n%s", logs.String())
		}
	})

	pod := func(port int, path string) string { return fmt.Sprintf("http://%s:%d%s", pair.PodIP, port, path) }
	local := func(path string) string { return "http://127.0.0.1:15020" + path }

	// Wait until it serves (kubelet would probe 15021 on the pod IP).
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := pair.Peer.RunErr(bin, "get", "GET", pod(15021, "/healthz/ready"))
		if err == nil && strings.HasPrefix(out, "200\n") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("never ready on %s: %q %v", pod(15021, "/healthz/ready"), out, err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// From the other namespace: readiness, probes and metrics answer; every
	// loopback-only endpoint answers 403 and does nothing.
	for _, tc := range []struct {
		method, url string
		want        int
	}{
		{"GET", pod(15021, "/healthz/ready"), 200},
		{"GET", pod(15020, "/healthz/ready"), 200},
		{"GET", pod(15020, "/app-health/app/readyz"), 200},
		{"GET", pod(15020, "/app-health/other/readyz"), 400},
		{"GET", pod(15020, "/stats/prometheus"), 200},
		{"POST", pod(15020, "/quitquitquit"), 403},
		{"GET", pod(15020, "/quitquitquit"), 403},
		{"POST", pod(15020, "/drain"), 403},
		{"GET", pod(15020, "/debug/pprof/"), 403},
		{"GET", pod(15020, "/debug/pprof/cmdline"), 403},
		{"GET", pod(15020, "/debug/pprof/heap"), 403},
		{"GET", pod(15020, "/debug/ndsz"), 403},
		{"POST", pod(15021, "/quitquitquit"), 404},
	} {
		if code, body := call(t, pair.Peer, bin, tc.method, tc.url); code != tc.want {
			t.Errorf("peer %s %s: %d %q, want %d", tc.method, tc.url, code, body, tc.want)
		}
	}
	if code, body := call(t, pair.Peer, bin, "GET", pod(15020, "/app-health/app/readyz")); !strings.Contains(body, "from 127.0.0.6 to "+pair.PodIP) {
		t.Errorf("app probe reached the app as %d %q, want from 127.0.0.6 to the pod IP", code, body)
	}

	// From inside the pod: loopback is trusted.
	if code, body := call(t, pair.Pod, bin, "GET", local("/debug/ndsz")); code != 200 || !strings.Contains(body, "db.example.com") {
		t.Errorf("pod GET /debug/ndsz: %d %q", code, body)
	}
	if code, _ := call(t, pair.Pod, bin, "GET", local("/debug/pprof/cmdline")); code != 200 {
		t.Errorf("pod GET /debug/pprof/cmdline: %d", code)
	}
	if code, _ := call(t, pair.Pod, bin, "GET", local("/drain")); code != 405 {
		t.Errorf("pod GET /drain: %d, want 405", code)
	}
	if code, body := call(t, pair.Pod, bin, "POST", local("/drain")); code != 200 || body != "OK" {
		t.Errorf("pod POST /drain: %d %q", code, body)
	}
	if code, _ := call(t, pair.Peer, bin, "GET", pod(15021, "/healthz/ready")); code != 503 {
		t.Errorf("readiness after /drain: %d, want 503", code)
	}
	if code, body := call(t, pair.Pod, bin, "POST", local("/quitquitquit")); code != 200 || body != "OK" {
		t.Errorf("pod POST /quitquitquit: %d %q", code, body)
	}
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Errorf("statusd after /quitquitquit: %v, want a clean exit", err)
		}
	case <-time.After(10 * time.Second):
		t.Errorf("statusd still running 10s after /quitquitquit")
	}
}
