package iptables

import (
	"context"
	"errors"

	"go.uber.org/zap"
)

// ErrValidationFailed marks a --run-validation failure: the redirect could not
// be proven with a real connection. The command exits 126 on it, as Istio does.
var ErrValidationFailed = errors.New("iptables validation failed: connections are not redirected")

// Execute applies plan to the kernel as cfg asks: cleanup only, apply (or
// reconcile, or nothing when the same rules are already there), the TPROXY
// policy routes, and the optional validation. Dry runs are handled by the
// caller, which prints plan without calling Execute.
func Execute(ctx context.Context, cfg *Config, plan *Plan, log *zap.Logger) error {
	return errors.New("iptables: Execute not implemented yet")
}
