package iptables

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	goipt "github.com/coreos/go-iptables/iptables"
	"go.uber.org/zap"
)

// cleanup removes everything we own, in both families, on every backend
// that holds any of it: every ISTIO_* chain and every rule that jumps to
// one, found in the saved state (not derived from the flags, so a run with
// other flags, or Istio's own rules, are removed too), plus the plan's
// rules in built-in chains that jump nowhere owned (-c/-k RETURNs, TPROXY
// marks), which only the flags can identify. One restore per backend and
// family; each table is one atomic commit. The TPROXY marks our rules set
// are read from the state before it goes, so that the policy routes of an
// apply with another -t/-r are found too (cleanupRoutes). It returns the final save
// output per backend for the log.
func cleanup(ctx context.Context, r *runner, cfg *Config, plan *Plan, log *zap.Logger) ([]finalState, error) {
	var errs []error
	var finals []finalState
	marks := map[uint32]bool{}
	for _, fam := range []Family{IPv4, IPv6} {
		var rs *Ruleset
		if fam == IPv4 {
			rs = plan.V4
		} else {
			rs = plan.V6
		}
		exp := expectRuleset(rs)
		for _, b := range findBackends(ctx, r, fam) {
			st := readState(ctx, r, b)
			if perr := permissionError(b, st.Err); perr != nil {
				// Nothing could be read, so nothing is known to be clean.
				errs = append(errs, fmt.Errorf("cleanup: %w", perr))
				continue
			}
			if st.Err != nil {
				// An IPv6-less kernel or a backend the kernel lacks holds
				// nothing of ours.
				log.Debug("backend not readable; nothing to clean there", zap.String("backend", b.String()), zap.Error(st.Err))
				continue
			}
			for _, m := range tproxyMarks(st.St) {
				marks[m] = true
			}
			input := transition(st.St, ownedBuiltin(st.St, exp), desired{})
			if input == "" {
				finals = append(finals, finalState{B: b, Save: st.Raw})
				continue
			}
			log.Info("removing ISTIO_* chains and jumps", zap.String("backend", b.String()))
			if err := restore(ctx, r, b, input); err != nil {
				if perr := permissionError(b, err); perr != nil {
					err = perr
				}
				errs = append(errs, fmt.Errorf("cleanup %s: %w", b, err))
				continue
			}
			if st.St.hasOwned() {
				missingBuiltin(ctx, b, st.St, exp, log)
			}
			after := readState(ctx, r, b)
			finals = append(finals, finalState{B: b, Save: after.Raw})
		}
	}
	if err := cleanupRoutes(ctx, r, cfg, plan, marks, log); err != nil {
		errs = append(errs, err)
	}
	return finals, errors.Join(errs...)
}

// tproxyMarks returns the marks our TPROXY rules set in st: "-j MARK
// --set-xmark M/..." in mangle ISTIO_DIVERT and "-j TPROXY ... --tproxy-mark
// M/..." in mangle ISTIO_TPROXY (iptables-save's spellings; the -t flag's
// mark). The policy rules "fwmark M lookup T" exist for these marks.
func tproxyMarks(st *savedState) []uint32 {
	t := st.table("mangle")
	if t == nil {
		return nil
	}
	var out []uint32
	for _, r := range t.Rules {
		var opts []string
		switch r.Chain {
		case ChainDivert:
			opts = []string{"--set-xmark", "--set-mark"}
		case ChainTProxy:
			opts = []string{"--tproxy-mark"}
		default:
			continue
		}
		f := strings.Fields(r.Spec)
		for i := 0; i+1 < len(f); i++ {
			if !slices.Contains(opts, f[i]) {
				continue
			}
			v, _, _ := strings.Cut(f[i+1], "/")
			if m, err := strconv.ParseUint(v, 0, 32); err == nil && m != 0 {
				out = append(out, uint32(m))
			}
		}
	}
	return out
}

// missingBuiltin is the safety net behind the canonical comparison: a
// plan rule in a built-in chain that was not found in the saved text (a
// spelling canonicalSpec does not know) is checked with "iptables -C" and
// deleted if present. With known spellings it finds nothing to do and
// costs no exec beyond go-iptables' version probe, and only runs when the
// backend held our chains.
func missingBuiltin(ctx context.Context, b *backend, st *savedState, exp map[string]*expectedTable, log *zap.Logger) {
	var ipt *goipt.IPTables
	for table, et := range exp {
		t := st.table(table)
		if t == nil {
			// The save lists every table that exists, so none of our rules
			// can be in this one; "-C" would create it (legacy), leaving an
			// empty table behind.
			continue
		}
		for chain, specs := range et.Rules {
			if IsOwnedChain(chain) {
				continue
			}
			for _, spec := range specs {
				if IsOwnedChain(specTarget(spec)) || hasRule(t, chain, spec) {
					continue
				}
				if ipt == nil {
					proto := goipt.ProtocolIPv4
					if b.Family == IPv6 {
						proto = goipt.ProtocolIPv6
					}
					var err error
					if ipt, err = goipt.New(goipt.IPFamily(proto), goipt.Path(b.Bin)); err != nil {
						log.Debug("go-iptables unavailable", zap.Error(err))
						return
					}
				}
				args := strings.Fields(spec)
				if ok, err := ipt.Exists(table, chain, args...); err == nil && ok {
					if err := ipt.Delete(table, chain, args...); err != nil {
						log.Warn("could not delete rule", zap.String("table", table), zap.String("chain", chain), zap.String("rule", spec), zap.Error(err))
					}
				}
			}
		}
	}
}

func hasRule(t *savedTable, chain, spec string) bool {
	for _, r := range t.Rules {
		if r.Chain == chain && r.Spec == spec {
			return true
		}
	}
	return false
}

// finalState is one backend's save output at the end of a run.
type finalState struct {
	B    *backend
	Save string
}
