package iptables

import (
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"
)

// savedTable is one table of iptables-save output.
type savedTable struct {
	Name string
	// Chains are the chains declared in the table (":NAME policy [c]"), in
	// save order: built-in chains first, then user chains alphabetically.
	Chains []string
	// Rules are the "-A" lines in save order (grouped by chain).
	Rules []savedRule
}

// savedRule is one "-A CHAIN SPEC" line of iptables-save output. Spec is
// the rule as iptables-save prints it (canonical form), so it can be fed
// back to restore with -A or -D.
type savedRule struct {
	Chain, Spec string
}

// savedState is the parsed output of one <backend>-save run.
type savedState struct {
	Tables []*savedTable
}

// parseSave parses iptables-save output. Comments are skipped; counters
// ("[0:0]" prefixes from -c) are not expected.
func parseSave(out string) (*savedState, error) {
	st := &savedState{}
	var cur *savedTable
	for n, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			cur = &savedTable{Name: strings.TrimSpace(line[1:])}
			st.Tables = append(st.Tables, cur)
		case line == "COMMIT":
			cur = nil
		case cur == nil:
			return nil, fmt.Errorf("save output line %d: %q outside a table", n+1, line)
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			cur.Chains = append(cur.Chains, name)
		case strings.HasPrefix(line, "-A "):
			chain, spec, _ := strings.Cut(line[3:], " ")
			cur.Rules = append(cur.Rules, savedRule{Chain: chain, Spec: spec})
		default:
			return nil, fmt.Errorf("save output line %d: unexpected %q", n+1, line)
		}
	}
	return st, nil
}

// table returns the named table, or nil.
func (s *savedState) table(name string) *savedTable {
	if s == nil {
		return nil
	}
	for _, t := range s.Tables {
		if t.Name == name {
			return t
		}
	}
	return nil
}

// ruleCount is the number of rules in every table: an empty table (which a
// probe like "iptables-legacy -t nat -L" creates) counts as nothing.
func (s *savedState) ruleCount() int {
	if s == nil {
		return 0
	}
	n := 0
	for _, t := range s.Tables {
		n += len(t.Rules)
	}
	return n
}

// hasOwned reports whether any table holds an owned chain or a jump to one.
func (s *savedState) hasOwned() bool {
	if s == nil {
		return false
	}
	for _, t := range s.Tables {
		if len(t.ownedChains()) > 0 {
			return true
		}
		for _, r := range t.Rules {
			if IsOwnedChain(specTarget(r.Spec)) {
				return true
			}
		}
	}
	return false
}

// ownedChains are the table's ISTIO_* chains.
func (t *savedTable) ownedChains() []string {
	var out []string
	for _, c := range t.Chains {
		if IsOwnedChain(c) {
			out = append(out, c)
		}
	}
	return out
}

// owned reports whether r is ours: any rule in an ISTIO_* chain, any jump to
// one, or a rule of the plan in a built-in chain (known, canonical specs).
func (t *savedTable) owned(r savedRule, planBuiltin map[string]bool) bool {
	return IsOwnedChain(r.Chain) || IsOwnedChain(specTarget(r.Spec)) || planBuiltin[r.Chain+" "+r.Spec]
}

// specTarget returns the -j/-g target of a canonical rule spec.
func specTarget(spec string) string {
	f := strings.Fields(spec)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "-j" || f[i] == "-g" {
			return f[i+1]
		}
	}
	return ""
}

// expectedTable is what a Ruleset should leave in one table, in the
// canonical form iptables-save prints.
type expectedTable struct {
	Name string
	// Chains are the owned chains, in plan order.
	Chains []string
	// Rules maps a chain to its rules in final order (inserts applied).
	// For built-in chains only our rules are listed.
	Rules map[string][]string
}

// expectRuleset computes the final per-chain order of rs's rules in
// canonical form, applying "-I chain N" positions as the kernel would.
func expectRuleset(rs *Ruleset) map[string]*expectedTable {
	out := map[string]*expectedTable{}
	if rs == nil {
		return out
	}
	for _, table := range rs.Tables() {
		out[table] = &expectedTable{Name: table, Chains: rs.Chains(table), Rules: map[string][]string{}}
	}
	for _, r := range rs.Rules {
		et := out[r.Table]
		spec := canonicalSpec(r.Args, rs.Family)
		rules := et.Rules[r.Chain]
		if r.Pos > 0 {
			i := min(r.Pos-1, len(rules))
			rules = slices.Insert(rules, i, spec)
		} else {
			rules = append(rules, spec)
		}
		et.Rules[r.Chain] = rules
	}
	return out
}

// builtinSpecs returns "CHAIN SPEC" keys of the plan's rules in built-in
// chains, per table: those are ours even when they jump nowhere owned (the
// -c/-k RETURN rules, TPROXY's marks).
func builtinSpecs(exp map[string]*expectedTable) map[string]map[string]bool {
	out := map[string]map[string]bool{}
	for table, et := range exp {
		m := map[string]bool{}
		for chain, specs := range et.Rules {
			if IsOwnedChain(chain) {
				continue
			}
			for _, s := range specs {
				m[chain+" "+s] = true
			}
		}
		out[table] = m
	}
	return out
}

// diffState compares the owned part of a saved state with the expectation.
// It returns "" when they are the same (same owned chains, same rules in
// the same order in every owned chain, our built-in rules in the same
// order), else a short description of the first difference.
func diffState(st *savedState, exp map[string]*expectedTable) string {
	tables := map[string]bool{}
	for name := range exp {
		tables[name] = true
	}
	if st != nil {
		for _, t := range st.Tables {
			tables[t.Name] = true
		}
	}
	builtin := ownedBuiltin(st, exp)
	for _, name := range slices.Sorted(maps.Keys(tables)) {
		et := exp[name]
		if et == nil {
			et = &expectedTable{Name: name, Rules: map[string][]string{}}
		}
		t := st.table(name)
		if t == nil {
			t = &savedTable{Name: name}
		}
		have := t.ownedChains()
		want := slices.Clone(et.Chains)
		slices.Sort(have)
		slices.Sort(want)
		if !slices.Equal(have, want) {
			return fmt.Sprintf("table %s: chains %v, want %v", name, have, want)
		}
		got := map[string][]string{}
		for _, r := range t.Rules {
			if t.owned(r, builtin[name]) {
				got[r.Chain] = append(got[r.Chain], r.Spec)
			}
		}
		chains := map[string]bool{}
		for c := range got {
			chains[c] = true
		}
		for c := range et.Rules {
			chains[c] = true
		}
		for _, c := range slices.Sorted(maps.Keys(chains)) {
			if !slices.Equal(got[c], et.Rules[c]) {
				return fmt.Sprintf("table %s chain %s: rules differ:\n  have %q\n  want %q", name, c, got[c], et.Rules[c])
			}
		}
	}
	return ""
}

// leftoverShapes are the rules Istio-style capture puts in built-in chains
// that jump to no ISTIO_* chain (the -c/-k interface RETURNs and TPROXY's
// mark handling), in canonical form. They are recognised as ours only in a
// backend that also holds ISTIO_* chains, so that a reconcile from other
// flags (TPROXY to REDIRECT, another -c) and a cleanup with other flags
// remove them too, not only the ones the current flags would build.
var leftoverShapes = map[string][]*regexp.Regexp{
	"PREROUTING": {
		regexp.MustCompile(`^-i \S+ -j RETURN$`),
		regexp.MustCompile(`^-p tcp -m mark --mark 0x[0-9a-f]+ -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff$`),
	},
	"OUTPUT": {
		regexp.MustCompile(`^-o \S+ -j RETURN$`),
		regexp.MustCompile(`^-o lo -p tcp -m mark --mark 0x[0-9a-f]+ -j RETURN$`),
		regexp.MustCompile(`^! -d \S+ -o lo -p tcp -m owner --[ug]id-owner \S+ -j MARK --set-xmark 0x[0-9a-f]+/0xffffffff$`),
		regexp.MustCompile(`^-p tcp -m connmark --mark 0x[0-9a-f]+ -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff$`),
	},
}

// ownedBuiltin returns, per table, the "CHAIN SPEC" keys of rules in
// built-in chains that are ours: the plan's, and in a state holding
// ISTIO_* chains also the leftover shapes of other flags.
func ownedBuiltin(st *savedState, exp map[string]*expectedTable) map[string]map[string]bool {
	out := builtinSpecs(exp)
	if !st.hasOwned() {
		return out
	}
	for _, t := range st.Tables {
		if t.Name != "nat" && t.Name != "mangle" {
			continue
		}
		for _, r := range t.Rules {
			for _, re := range leftoverShapes[r.Chain] {
				if re.MatchString(r.Spec) {
					if out[t.Name] == nil {
						out[t.Name] = map[string]bool{}
					}
					out[t.Name][r.Chain+" "+r.Spec] = true
				}
			}
		}
	}
	return out
}
