package iptables

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"go.uber.org/zap"
)

// ErrValidationFailed marks a --run-validation failure: the redirect could not
// be proven with a real connection. The command exits 126 on it, as Istio does.
var ErrValidationFailed = errors.New("iptables validation failed: connections are not redirected")

// Execute applies plan to the kernel as cfg asks, inside
// cfg.NetworkNamespace when set. With CleanupOnly it removes everything
// Outrigger or Istio owns and stops. Otherwise, unless SkipRuleApply, it
// applies each family atomically (one restore per family; nothing when the
// same rules are already there; a safe in-place reconcile when they
// differ), rolls IPv4 back if IPv6 fails, and adds the TPROXY policy
// routes. RunValidation then proves the redirect. The final state is
// logged. Dry runs are handled by the caller, which prints plan.
func Execute(ctx context.Context, cfg *Config, plan *Plan, log *zap.Logger) error {
	r := &runner{log: log}
	return inNetns(cfg.NetworkNamespace, func() error {
		if cfg.CleanupOnly {
			finals, err := cleanup(ctx, r, cfg, plan, log)
			logFinal(log, finals)
			if err != nil {
				return err
			}
			log.Info("cleanup done")
			return nil
		}
		if !cfg.SkipRuleApply {
			if err := apply(ctx, r, cfg, plan, log); err != nil {
				return err
			}
		}
		if cfg.RunValidation {
			return validate(ctx, cfg, log)
		}
		return nil
	})
}

// apply applies every family, then the routes. A failure in a later family
// undoes the earlier ones, so the pod never keeps half its capture.
func apply(ctx context.Context, r *runner, cfg *Config, plan *Plan, log *zap.Logger) error {
	var done []*applied
	undo := func() {
		for _, a := range done {
			if a.Changed {
				rollback(ctx, r, a.B, a.Pre, a.Builtin, log)
			}
		}
	}
	for _, rs := range plan.Rulesets() {
		a, err := applyFamily(ctx, r, cfg, rs, log)
		if err != nil {
			undo()
			return err
		}
		done = append(done, a)
	}
	if err := applyRoutes(ctx, r, plan); err != nil {
		undo()
		return err
	}
	var finals []finalState
	for _, a := range done {
		f := finalState{B: a.B, Save: a.Final}
		if a.Changed {
			f.Save = readState(ctx, r, a.B).Raw
		}
		finals = append(finals, f)
	}
	logFinal(log, finals)
	return nil
}

func logFinal(log *zap.Logger, finals []finalState) {
	for _, f := range finals {
		log.Info("final iptables state", zap.String("backend", f.B.String()),
			zap.String("save", strings.TrimSpace(dropComments(f.Save))))
	}
}

func dropComments(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(l, "#") && l != "" {
			fmt.Fprintln(&b, l)
		}
	}
	return b.String()
}
