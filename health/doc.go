// Package health is the pod's status server: what kubelet and Prometheus talk
// to. It answers readiness on the status port (15020) and on the readiness
// port (15021, which Istio routes through Envoy but Outrigger serves itself),
// runs the application probes the injector rewrote to point at the agent,
// merges the agent's, Envoy's and the application's metrics into one scrape,
// and offers loopback-only lifecycle endpoints (/quitquitquit, /drain) and
// debug endpoints (/debug/pprof, /debug/ndsz).
//
// The server depends on the rest of the agent only through the hooks in
// Config (DNSReady, OnQuit, OnDrain, NameTable) and a Prometheus registry, so
// the Envoy supervisor and the DNS proxy stay independent of it.
package health
