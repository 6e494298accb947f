package iptables_test

import (
	"strings"
	"testing"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// With --network-namespace the pod's own addresses decide whether IPv6
// rules are built, not those of the namespace the command runs in (the CNI
// case). The pod here has only an IPv6 address; the runner's namespace has
// none at all besides loopback.
func TestNetworkNamespaceFlagReadsPodAddresses(t *testing.T) {
	testenv.RequireRoot(t)
	runner := testenv.NewNetns(t, "nsr")
	pod := testenv.NewNetns(t, "nsp")
	pod.Run(t, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	pod.Run(t, "ip", "link", "set", "d1", "up")
	pod.Run(t, "ip", "-6", "addr", "add", "fd00:77::2/64", "dev", "d0", "nodad")
	pod.Run(t, "ip", "link", "set", "d0", "up")

	out := runner.Run(t, testenv.Outrigger(t), "istio-iptables", "--dry-run",
		"--network-namespace", pod.Path(), "-p", "15001", "-z", "15006", "-u", "1337",
		"-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020")
	if !strings.Contains(out, "ip6tables-restore") || !strings.Contains(out, "::6/128") {
		t.Errorf("pod with an IPv6 address got no IPv6 rules; dry run:\n%s", out)
	}

	// The same flags run in the pod's namespace directly agree.
	direct := pod.Run(t, testenv.Outrigger(t), "istio-iptables", "--dry-run", "-p", "15001", "-z", "15006",
		"-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020")
	if direct != out {
		t.Errorf("--network-namespace output differs from running inside the namespace:\nflag:\n%s\ninside:\n%s", out, direct)
	}
}
