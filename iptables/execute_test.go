package iptables

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestExecuteValidation runs --run-validation in-process. With the proxy
// uid set to root's (0), this test's own loopback connection is the one
// Istio's rules redirect, so the validation passes after the apply and
// fails (ErrValidationFailed) with --skip-rule-apply in an empty namespace.
func TestExecuteValidation(t *testing.T) {
	args := append(append([]string{}, injectorArgs...), "-u", "0", "-g", "0", "--iptables-probe-port", "15002")
	for _, tt := range []struct {
		name    string
		skip    bool
		wantErr error
	}{
		{name: "rules applied", wantErr: nil},
		{name: "no rules", skip: true, wantErr: ErrValidationFailed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ns := kernelNetns(t)
			cfg := configFor(t, goldenCase{args: args})
			cfg.NetworkNamespace, cfg.RunValidation, cfg.SkipRuleApply = ns, true, tt.skip
			cfg.ProbeTimeout = 1500 * time.Millisecond
			log, logs := testLogger()
			err := Execute(context.Background(), cfg, mustBuild(t, cfg), log)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
				t.Fatalf("Execute = %v, want %v", err, tt.wantErr)
			}
			if tt.wantErr == nil && logs.FilterMessageSnippet("validation passed").Len() != 1 {
				t.Error("no 'validation passed' log")
			}
			if tt.skip && saveState(t, ns, "iptables-nft-save").hasOwned() {
				t.Error("--skip-rule-apply applied rules")
			}
		})
	}
}
