// Package lifecycle tests one pod's whole life end to end, with the same
// steps the demo narrates: the real outrigger binary in network namespaces
// with real iptables, envoysim as Envoy, the test control plane and CA.
package lifecycle

import (
	"context"
	"io"
	"os"
	"testing"
	"time"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
	"github.com/outrigger-mesh/outrigger/e2e/podlife"
)

func newPod(t testing.TB) *podlife.Pod {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommands(t, "ip", "iptables-restore", "getent", "setpriv", "pgrep")
	bin := podlife.Binaries{
		Outrigger:    testenv.Outrigger(t),
		Envoy:        testenv.Build(t, "./e2e/envoysim"),
		ControlPlane: testenv.Build(t, "./e2e/controlplane/cmd/controlplane"),
		CA:           testenv.Build(t, "./e2e/testca/cmd/testca"),
		Tool:         testenv.Build(t, "./e2e/demo"),
	}
	var log io.Writer
	if testing.Verbose() {
		log = os.Stdout
	}
	pod, err := podlife.New(bin, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pod.Close)
	return pod
}

// runSteps runs steps in order as subtests and stops at the first failure:
// every step depends on the ones before it.
func runSteps(t *testing.T, steps []podlife.Step) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for _, s := range steps {
		ok := t.Run(s.Name, func(t *testing.T) {
			detail, err := s.Run(ctx)
			if err != nil {
				t.Fatal(err)
			}
			t.Log(detail)
		})
		if !ok {
			t.FailNow()
		}
	}
}

// The whole life: capture, sidecar ready (the app held by outrigger wait),
// certificate, DNS, a captured call, kubelet's probe, a control-plane
// restart, the drain on SIGTERM and a clean namespace.
func TestPodLifecycle(t *testing.T) {
	pod := newPod(t)
	runSteps(t, pod.Lifecycle())
}

// A Job's app ends the pod with POST /quitquitquit: no drain wait.
func TestJobQuitQuitQuit(t *testing.T) {
	pod := newPod(t)
	runSteps(t, pod.JobLife())
}

// A native sidecar's preStop drains through /drain before SIGTERM.
func TestNativeSidecarDrainThenTerm(t *testing.T) {
	pod := newPod(t)
	runSteps(t, pod.NativeSidecarLife())
}
