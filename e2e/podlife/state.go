package podlife

import (
	"context"

	"github.com/outrigger-mesh/outrigger/internal/netstate"
)

// iptablesState is the pod namespace's capture state: both iptables
// backends for both families, policy rules, routes and loopback's
// addresses (see netstate), for before/after comparisons.
func (p *Pod) iptablesState(ctx context.Context) (string, error) {
	return netstate.Snapshot(func(name string, args ...string) (string, error) {
		return p.InPod(ctx, name, args...)
	}), nil
}
