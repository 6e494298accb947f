package iptables

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"go.uber.org/zap"
)

// desired is the owned part of a table set that a transition moves to.
type desired struct {
	// Chains are the owned chains per table.
	Chains map[string][]string
	// Lines are the restore lines per table ("-A ..." or "-I chain N ...").
	Lines map[string][]string
}

// desiredFromRuleset is what rs asks for.
func desiredFromRuleset(rs *Ruleset) desired {
	d := desired{Chains: map[string][]string{}, Lines: map[string][]string{}}
	if rs == nil {
		return d
	}
	for _, t := range rs.Tables() {
		d.Chains[t] = rs.Chains(t)
	}
	for _, r := range rs.Rules {
		d.Lines[r.Table] = append(d.Lines[r.Table], r.Spec(r.Verb()))
	}
	return d
}

// desiredFromSaved is the owned part of a saved state, to go back to it.
// Our rules in built-in chains are appended, so relative to rules of others
// they may come back at another position.
func desiredFromSaved(st *savedState, builtin map[string]map[string]bool) desired {
	d := desired{Chains: map[string][]string{}, Lines: map[string][]string{}}
	if st == nil {
		return d
	}
	for _, t := range st.Tables {
		if cs := t.ownedChains(); len(cs) > 0 {
			d.Chains[t.Name] = cs
		}
		for _, r := range t.Rules {
			if t.owned(r, builtin[t.Name]) {
				d.Lines[t.Name] = append(d.Lines[t.Name], "-A "+r.Chain+" "+r.Spec)
			}
		}
	}
	return d
}

// transition renders one restore input that replaces, table by table, what
// we own in cur with want. Each table is one COMMIT, which the kernel
// applies atomically (legacy swaps the table blob, nft commits one batch),
// so within a table no packet sees a half-changed rule set: the old jumps
// and chains are removed, the chains refilled and the new jumps added in
// the same commit. Tables that will hold rules are written first and
// tables that only lose rules last, so capture is never off between two
// table commits (at worst both old and new capture briefly coexist).
// builtin names the plan's rules in built-in chains that count as ours.
// It returns "" when there is nothing to do.
func transition(cur *savedState, builtin map[string]map[string]bool, want desired) string {
	tables := map[string]bool{}
	for t := range want.Chains {
		tables[t] = true
	}
	for t := range want.Lines {
		tables[t] = true
	}
	if cur != nil {
		for _, t := range cur.Tables {
			tables[t.Name] = true
		}
	}
	order := slices.Collect(maps.Keys(tables))
	slices.SortFunc(order, func(a, b string) int {
		wa, wb := len(want.Lines[a]) > 0, len(want.Lines[b]) > 0
		if wa != wb {
			if wa {
				return -1
			}
			return 1
		}
		return cmp.Compare(a, b)
	})

	var b strings.Builder
	for _, name := range order {
		var body []string
		have := map[string]bool{}
		if t := cur.table(name); t != nil {
			for _, r := range t.Rules {
				if !IsOwnedChain(r.Chain) && t.owned(r, builtin[name]) {
					body = append(body, "-D "+r.Chain+" "+r.Spec)
				}
			}
			for _, c := range t.ownedChains() {
				have[c] = true
				body = append(body, "-F "+c)
			}
			keep := map[string]bool{}
			for _, c := range want.Chains[name] {
				keep[c] = true
			}
			for _, c := range t.ownedChains() {
				if !keep[c] {
					body = append(body, "-X "+c)
				}
			}
		}
		for _, c := range want.Chains[name] {
			if !have[c] {
				body = append(body, "-N "+c)
			}
		}
		body = append(body, want.Lines[name]...)
		if len(body) == 0 {
			continue
		}
		b.WriteString("*" + name + "\n")
		for _, l := range body {
			b.WriteString(l + "\n")
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// restore feeds input to one "<backend>-restore --noflush".
func restore(ctx context.Context, r *runner, b *backend, input string) error {
	if input == "" {
		return nil
	}
	if _, err := r.run(ctx, input, b.Restore, b.restoreArgs()...); err != nil {
		return fmt.Errorf("%s-restore: %w", b, err)
	}
	return nil
}

// applied records one family's change, so it can be undone.
type applied struct {
	B       *backend
	Pre     *savedState
	Builtin map[string]map[string]bool
	// Changed is false when the rules were already in place.
	Changed bool
	// Final is the save output after the run, for the final-state log.
	Final string
}

// applyFamily brings one family's rules to rs: nothing when they are
// already exactly there, else one atomic transition in the chosen backend,
// then removal of ISTIO_* leftovers in the other backend. On failure the
// family is back where it was.
func applyFamily(ctx context.Context, r *runner, cfg *Config, rs *Ruleset, log *zap.Logger) (*applied, error) {
	log = log.With(zap.String("family", rs.Family.String()))
	bes := findBackends(ctx, r, rs.Family)
	if len(bes) == 0 {
		return nil, fmt.Errorf("%s: no %s tools on PATH (install the iptables package)", rs.Family, familyPrefix(rs.Family))
	}
	states := make([]*backendState, 0, len(bes))
	for _, b := range bes {
		st := readState(ctx, r, b)
		if perr := permissionError(b, st.Err); perr != nil {
			return nil, fmt.Errorf("%s: %w", rs.Family, perr)
		}
		states = append(states, st)
	}
	c, err := chooseBackend(cfg.ForceIptablesBinary, states)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", rs.Family, err)
	}
	logChoice(log, c, states)

	exp := expectRuleset(rs)
	others := func(chosen *backendState) []*backendState {
		var out []*backendState
		for _, s := range states {
			if s != chosen && s.Err == nil && s.St.hasOwned() {
				out = append(out, s)
			}
		}
		return out
	}

	builtin := ownedBuiltin(c.St, exp)
	diff := diffState(c.St, exp)
	if diff == "" && len(others(c.backendState)) == 0 && !cfg.ForceApply {
		log.Info("iptables rules already applied; nothing to change", zap.String("backend", c.B.String()))
		return &applied{B: c.B, Pre: c.St, Builtin: builtin, Final: c.Raw}, nil
	}
	if c.St.hasOwned() {
		log.Info("reconciling existing ISTIO_* rules to the new set in one atomic restore per table",
			zap.String("backend", c.B.String()), zap.String("difference", cmp.Or(diff, "none (--force-apply)")))
	}

	input := transition(c.St, builtin, desiredFromRuleset(rs))
	err = restore(ctx, r, c.B, input)
	if kerr := kernelSupportError(c.B, err); kerr != nil {
		err = kerr
		if !c.Pinned {
			// Only an unpinned choice (empty namespace) may move: try the
			// other variant, which nothing in the namespace contradicts.
			for _, s := range states {
				if s == c.backendState || s.Err != nil {
					continue
				}
				log.Warn("backend does not work in this kernel; trying the other one",
					zap.String("backend", c.B.String()), zap.Error(kerr), zap.String("next", s.B.String()))
				rollback(ctx, r, c.B, c.St, builtin, log)
				c = choice{backendState: s, Reason: "fallback: " + kerr.Error()}
				builtin = ownedBuiltin(s.St, exp)
				err = restore(ctx, r, s.B, transition(s.St, builtin, desiredFromRuleset(rs)))
				if k2 := kernelSupportError(s.B, err); k2 != nil {
					err = errors.Join(kerr, k2)
				}
				break
			}
		}
	}
	if err != nil {
		if perr := permissionError(c.B, err); perr != nil {
			err = perr
		}
		rollback(ctx, r, c.B, c.St, builtin, log)
		return nil, fmt.Errorf("%s: apply: %w", rs.Family, err)
	}
	a := &applied{B: c.B, Pre: c.St, Builtin: builtin, Changed: true}
	for _, o := range others(c.backendState) {
		log.Warn("removing ISTIO_* leftovers from the backend not in use", zap.String("backend", o.B.String()))
		if err := restore(ctx, r, o.B, transition(o.St, ownedBuiltin(o.St, exp), desired{})); err != nil {
			log.Warn("could not remove leftovers; they are inert without our jumps only if their jumps went too",
				zap.String("backend", o.B.String()), zap.Error(err))
		}
	}
	return a, nil
}

// rollback puts a backend's owned rules back to pre after a failed or
// undone apply: a restore may have committed some tables before a later
// one failed. It is best effort and logs what it could not do.
func rollback(ctx context.Context, r *runner, b *backend, pre *savedState, builtin map[string]map[string]bool, log *zap.Logger) {
	now := readState(ctx, r, b)
	if now.Err != nil {
		log.Warn("rollback: cannot read state", zap.String("backend", b.String()), zap.Error(now.Err))
		return
	}
	want := desiredFromSaved(pre, builtin)
	input := transition(now.St, builtin, want)
	if diffSaved(now.St, pre, builtin) == "" {
		return
	}
	if err := restore(ctx, r, b, input); err != nil {
		log.Error("rollback failed: the namespace may hold part of the rules; run with --cleanup-only",
			zap.String("backend", b.String()), zap.Error(err))
		return
	}
	log.Info("rolled back to the previous rules", zap.String("backend", b.String()))
}

// diffSaved compares the owned parts of two saved states.
func diffSaved(a, b *savedState, builtin map[string]map[string]bool) string {
	owned := func(st *savedState) string {
		var s strings.Builder
		if st == nil {
			return ""
		}
		for _, t := range st.Tables {
			for _, c := range t.ownedChains() {
				s.WriteString(t.Name + " -N " + c + "\n")
			}
			for _, r := range t.Rules {
				if t.owned(r, builtin[t.Name]) {
					s.WriteString(t.Name + " -A " + r.Chain + " " + r.Spec + "\n")
				}
			}
		}
		return s.String()
	}
	if oa, ob := owned(a), owned(b); oa != ob {
		return "owned rules differ"
	}
	return ""
}
