// Package iptables_test runs "outrigger istio-iptables" inside a pod
// network namespace joined to a peer by a veth pair, and checks with real
// packets that traffic is captured as Istio's rules capture it.
package iptables_test

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

func requireTools(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommands(t, "ip", "iptables-legacy-restore", "iptables-nft-restore")
}

// TestCapture applies the injector's flags (with DNS capture) on each
// backend and checks outbound, proxy-uid exemption, inbound, excluded
// ports, DNS over UDP and TCP, the re-run and the cleanup.
func TestCapture(t *testing.T) {
	requireTools(t)
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			p := testenv.NewPair(t, "c"+backend[:1], false)
			resolvConf(t, p.Pod, p.PeerIP)
			env := []string{"ISTIO_META_DNS_CAPTURE=true", "FORCE_IPTABLES_BINARY=" + backend}
			before := snapshot(t, p.Pod)

			out := mustOutrigger(t, p.Pod, env, injector...)
			if !strings.Contains(out, "iptables-"+backend) {
				t.Errorf("log does not name the backend iptables-%s:\n%s", backend, out)
			}
			applied := snapshot(t, p.Pod)

			outbound := listen(t, p.Pod, "0.0.0.0:15001", false)
			inbound := listen(t, p.Pod, "0.0.0.0:15006", false)
			peerApp := listen(t, p.Peer, "0.0.0.0:8080", false)

			t.Run("outbound reaches 15001 with the original destination", func(t *testing.T) {
				dial(t, p.Pod, p.PeerIP+":8080", "app")
				a, ok := acceptOne(t, outbound, true)
				if !ok {
					t.Fatal("nothing reached 15001")
				}
				if want := netip.MustParseAddrPort(p.PeerIP + ":8080"); a.OrigDst != want || a.Payload != "app" {
					t.Errorf("15001 saw original dst %v payload %q, want %v \"app\"", a.OrigDst, a.Payload, want)
				}
			})
			t.Run("the proxy uid is not captured", func(t *testing.T) {
				if got := dialAs1337(t, p.Pod, p.PeerIP+":8080"); got != "ok" {
					t.Fatalf("helper as 1337: %s", got)
				}
				a, ok := acceptOne(t, peerApp, false)
				if !ok || a.Payload != "from-1337" {
					t.Errorf("peer app got %+v (ok %v), want the uid 1337 connection", a, ok)
				}
				if _, ok := acceptOne(t, outbound, false); ok {
					t.Error("a uid 1337 connection was captured to 15001")
				}
			})
			t.Run("inbound reaches 15006", func(t *testing.T) {
				dial(t, p.Peer, p.PodIP+":9090", "peer")
				a, ok := acceptOne(t, inbound, true)
				if !ok {
					t.Fatal("nothing reached 15006")
				}
				if want := netip.MustParseAddrPort(p.PodIP + ":9090"); a.OrigDst != want {
					t.Errorf("15006 saw original dst %v, want %v", a.OrigDst, want)
				}
			})
			t.Run("excluded inbound port is not captured", func(t *testing.T) {
				direct := listen(t, p.Pod, "0.0.0.0:15020", false)
				dial(t, p.Peer, p.PodIP+":15020", "status")
				if a, ok := acceptOne(t, direct, false); !ok || a.Payload != "status" {
					t.Errorf("15020 got %+v (ok %v), want the peer's connection", a, ok)
				}
				if _, ok := acceptOne(t, inbound, false); ok {
					t.Error("excluded port 15020 was captured to 15006")
				}
			})
			t.Run("DNS over UDP and TCP reaches 15053", func(t *testing.T) {
				var udp *net.UDPConn
				p.Pod.In(t, func() {
					c, err := net.ListenPacket("udp", "0.0.0.0:15053")
					if err != nil {
						t.Error(err)
						return
					}
					udp = c.(*net.UDPConn)
				})
				if udp == nil {
					t.FailNow()
				}
				defer udp.Close()
				tcp := listen(t, p.Pod, "0.0.0.0:15053", false)
				p.Pod.In(t, func() {
					c, err := net.Dial("udp", p.PeerIP+":53")
					if err != nil {
						t.Error(err)
						return
					}
					c.Write([]byte("query"))
					c.Close()
				})
				_ = udp.SetReadDeadline(time.Now().Add(time.Second))
				buf := make([]byte, 64)
				if n, _, err := udp.ReadFrom(buf); err != nil || string(buf[:n]) != "query" {
					t.Errorf("UDP 15053 read %q, %v; want the query", buf[:n], err)
				}
				dial(t, p.Pod, p.PeerIP+":53", "tcp-query")
				a, ok := acceptOne(t, tcp, true)
				if !ok || a.OrigDst != netip.MustParseAddrPort(p.PeerIP+":53") {
					t.Errorf("TCP 15053 got %+v (ok %v), want original dst %s:53", a, ok, p.PeerIP)
				}
			})

			t.Run("re-run with the same flags changes nothing", func(t *testing.T) {
				out := mustOutrigger(t, p.Pod, env, injector...)
				if !strings.Contains(out, "already applied") {
					t.Errorf("re-run log does not say already applied:\n%s", out)
				}
				if d := cmp.Diff(applied, snapshot(t, p.Pod)); d != "" {
					t.Errorf("re-run changed the state (-before +after):\n%s", d)
				}
			})
			t.Run("cleanup restores the namespace", func(t *testing.T) {
				mustOutrigger(t, p.Pod, env, append(append([]string{}, injector...), "--cleanup-only")...)
				if d := cmp.Diff(before, snapshot(t, p.Pod)); d != "" {
					t.Errorf("cleanup left state behind (-before +after):\n%s", d)
				}
				dial(t, p.Pod, p.PeerIP+":8080", "after")
				if a, ok := acceptOne(t, peerApp, false); !ok || a.Payload != "after" {
					t.Errorf("after cleanup the peer app got %+v (ok %v), want a direct connection", a, ok)
				}
			})
		})
	}
}

// TestTPROXYKeepsSource checks that inbound traffic in TPROXY mode reaches
// a transparent listener on 15006 with the peer's own address, and that
// the cleanup removes the policy routes.
func TestTPROXYKeepsSource(t *testing.T) {
	requireTools(t)
	p := testenv.NewPair(t, "tp", false)
	before := snapshot(t, p.Pod)
	args := append(append([]string{}, injector...), "-m", "TPROXY")
	mustOutrigger(t, p.Pod, nil, args...)
	if rules := p.Pod.Run(t, "ip", "rule"); !strings.Contains(rules, "fwmark 0x539 lookup 133") {
		t.Fatalf("no TPROXY policy rule:\n%s", rules)
	}
	ln := listen(t, p.Pod, "0.0.0.0:15006", true)
	dial(t, p.Peer, p.PodIP+":9090", "tproxy")
	a, ok := acceptOne(t, ln, false)
	if !ok {
		t.Fatal("nothing reached the transparent listener on 15006")
	}
	if a.Remote.Addr().String() != p.PeerIP || a.Local.String() != p.PodIP+":9090" || a.Payload != "tproxy" {
		t.Errorf("15006 saw %v -> %v (%q), want %s -> %s:9090", a.Remote, a.Local, a.Payload, p.PeerIP, p.PodIP)
	}
	mustOutrigger(t, p.Pod, nil, append(args, "--cleanup-only")...)
	if d := cmp.Diff(before, snapshot(t, p.Pod)); d != "" {
		t.Errorf("cleanup left state behind (-before +after):\n%s", d)
	}
}

// TestIPv6 checks outbound capture of IPv6 with the original destination
// in a dual-stack pod (its first address is IPv4, so as with Istio IPv6
// rules need --dual-stack).
func TestIPv6(t *testing.T) {
	requireTools(t)
	p := testenv.NewPair(t, "v6", true)
	before := snapshot(t, p.Pod)
	args := append(append([]string{}, injector...), "--dual-stack")
	mustOutrigger(t, p.Pod, nil, args...)
	ln := listen(t, p.Pod, "[::]:15001", false)
	dst := "[" + p.PeerIP6 + "]:8080"
	dial(t, p.Pod, dst, "v6")
	a, ok := acceptOne(t, ln, true)
	if !ok {
		t.Fatal("nothing reached [::]:15001")
	}
	if a.OrigDst != netip.MustParseAddrPort(dst) {
		t.Errorf("original dst %v, want %s", a.OrigDst, dst)
	}
	mustOutrigger(t, p.Pod, nil, append(args, "--cleanup-only")...)
	if d := cmp.Diff(before, snapshot(t, p.Pod)); d != "" {
		t.Errorf("cleanup left state behind (-before +after):\n%s", d)
	}
}

// TestIPv6DisabledIsNotAnError: a pod without IPv6 (disable_ipv6) gets its
// IPv4 rules and no error.
func TestIPv6DisabledIsNotAnError(t *testing.T) {
	requireTools(t)
	p := testenv.NewPair(t, "n6", false)
	mustOutrigger(t, p.Pod, nil, injector...)
	if out := p.Pod.Run(t, "ip6tables-nft-save"); strings.Contains(out, "ISTIO") {
		t.Errorf("IPv6 rules in a pod without IPv6:\n%s", out)
	}
}

// TestIP6TablesUnusableIsNotAnError: on a node booted with ipv6.disable=1
// every ip6tables tool fails ("Address family not supported"). Shadowing
// them on PATH with tools that fail that way, a v4 pod's apply and cleanup
// (with other flags) must both succeed and leave the namespace as it was.
func TestIP6TablesUnusableIsNotAnError(t *testing.T) {
	requireTools(t)
	dir := t.TempDir()
	fail := "#!/bin/sh\necho \"ip6tables v1.8.9: can't initialize ip6tables table 'filter': Address family not supported by protocol\" >&2\nexit 3\n"
	for _, tool := range []string{"ip6tables", "ip6tables-nft", "ip6tables-nft-save", "ip6tables-nft-restore", "ip6tables-legacy", "ip6tables-legacy-save", "ip6tables-legacy-restore"} {
		if err := os.WriteFile(filepath.Join(dir, tool), []byte(fail), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	env := []string{"PATH=" + dir + ":" + os.Getenv("PATH")}
	p := testenv.NewPair(t, "u6", false)
	before := snapshot(t, p.Pod)
	mustOutrigger(t, p.Pod, env, append(append([]string{}, injector...), "--redirect-dns", "--capture-all-dns")...)
	if out := p.Pod.Run(t, "iptables-nft-save"); !strings.Contains(out, "-A OUTPUT -j ISTIO_OUTPUT") {
		t.Fatalf("no IPv4 rules applied:\n%s", out)
	}
	mustOutrigger(t, p.Pod, env, "--cleanup-only", "-m", "TPROXY")
	if d := cmp.Diff(before, snapshot(t, p.Pod)); d != "" {
		t.Errorf("cleanup left state behind (-before +after):\n%s", d)
	}
}
