package main

import (
	"context"
	"fmt"
	"strings"
)

const (
	podIP  = "10.20.0.2"
	peerIP = "10.20.0.1"
)

// injectedInitArgs are the arguments Istio's injector gives the istio-init
// container by default.
var injectedInitArgs = []string{
	"istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
	"-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info",
}

func (d *demo) steps() []step {
	return []step{
		{"create the pod and peer network namespaces", d.setupNamespaces},
		{"init container: outrigger istio-iptables (injector's default flags)", d.initCapture},
		{"init container re-run (restart of the pod): nothing changes", d.initRerun},
		{"app's outbound TCP is captured on 15001 with its original destination", d.outboundCaptured},
		{"peer's inbound TCP is captured on 15006", d.inboundCaptured},
		{"cleanup: outrigger istio-iptables --cleanup-only", d.cleanupCapture},
	}
}

func (d *demo) setupNamespaces(ctx context.Context) (string, error) {
	if err := d.makeNamespaces(ctx); err != nil {
		return "", err
	}
	before, err := d.iptablesState(ctx)
	if err != nil {
		return "", err
	}
	d.initialState = before
	return fmt.Sprintf("veth pair up, pod %s routes via peer %s", podIP, peerIP), nil
}

func (d *demo) initCapture(ctx context.Context) (string, error) {
	out, err := d.inPod(ctx, d.outrigger, injectedInitArgs...)
	if err != nil {
		return "", fmt.Errorf("%w\n%s", err, out)
	}
	state, err := d.iptablesState(ctx)
	if err != nil {
		return "", err
	}
	d.appliedState = state
	n := strings.Count(state, "\n-A ")
	return fmt.Sprintf("%d rules in ISTIO_* chains; look: ip netns exec %s iptables-save", n, d.ns("pod")), nil
}

func (d *demo) initRerun(ctx context.Context) (string, error) {
	out, err := d.inPod(ctx, d.outrigger, injectedInitArgs...)
	if err != nil {
		return "", fmt.Errorf("%w\n%s", err, out)
	}
	state, err := d.iptablesState(ctx)
	if err != nil {
		return "", err
	}
	if state != d.appliedState {
		return "", fmt.Errorf("rules changed on re-run:\nbefore:\n%s\nafter:\n%s", d.appliedState, state)
	}
	return "exit 0, identical rules", nil
}

func (d *demo) outboundCaptured(ctx context.Context) (string, error) {
	orig, err := d.captureOnce(ctx, "15001", func() error {
		_, err := d.inPod(ctx, d.self, "dial", peerIP+":8080")
		return err
	})
	if err != nil {
		return "", err
	}
	if orig != peerIP+":8080" {
		return "", fmt.Errorf("listener on 15001 saw original destination %q, want %s:8080", orig, peerIP)
	}
	return fmt.Sprintf("app dialed %s:8080, the proxy port 15001 accepted it, SO_ORIGINAL_DST=%s", peerIP, orig), nil
}

func (d *demo) inboundCaptured(ctx context.Context) (string, error) {
	orig, err := d.captureOnce(ctx, "15006", func() error {
		_, err := d.inPeer(ctx, d.self, "dial", podIP+":9080")
		return err
	})
	if err != nil {
		return "", err
	}
	if orig != podIP+":9080" {
		return "", fmt.Errorf("listener on 15006 saw original destination %q, want %s:9080", orig, podIP)
	}
	return fmt.Sprintf("peer dialed %s:9080, the inbound port 15006 accepted it, SO_ORIGINAL_DST=%s", podIP, orig), nil
}

func (d *demo) cleanupCapture(ctx context.Context) (string, error) {
	args := append(append([]string{}, injectedInitArgs...), "--cleanup-only")
	if out, err := d.inPod(ctx, d.outrigger, args...); err != nil {
		return "", fmt.Errorf("%w\n%s", err, out)
	}
	state, err := d.iptablesState(ctx)
	if err != nil {
		return "", err
	}
	if state != d.initialState {
		return "", fmt.Errorf("namespace not back to its initial state:\nbefore:\n%s\nafter:\n%s", d.initialState, state)
	}
	return "no ISTIO_* chain or jump left; iptables state equals the state before init", nil
}
