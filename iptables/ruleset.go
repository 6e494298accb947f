// Package iptables programs the pod's traffic capture: the init container's
// job (outrigger istio-iptables). It turns Istio-compatible flags into a
// typed Config, builds the rules per IP family, applies each family
// atomically with one iptables-restore, and can verify and undo what it owns.
package iptables

import (
	"sort"
	"strconv"
	"strings"
)

// Family is an IP family: rules are built, applied and cleaned per family.
type Family int

const (
	// IPv4 rules go through iptables-restore.
	IPv4 Family = iota
	// IPv6 rules go through ip6tables-restore.
	IPv6
)

func (f Family) String() string {
	if f == IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

// Rule is one iptables rule as it appears in iptables-restore input.
type Rule struct {
	// Table is filter, mangle, nat or raw.
	Table string
	// Chain is the chain the rule lives in (built-in or ISTIO_*).
	Chain string
	// Pos is the 1-based position for an insert ("-I chain Pos"); 0 appends
	// ("-A chain"). Inserts are applied in build order, so of several
	// "-I chain 1" rules the last one ends up first, as with Istio.
	Pos int
	// Args are the match and target arguments after the chain name,
	// e.g. ["-p", "tcp", "-j", "ISTIO_INBOUND"].
	Args []string
}

// Target returns the rule's jump target (the argument after -j), or "".
func (r Rule) Target() string {
	for i := 0; i+1 < len(r.Args); i++ {
		if r.Args[i] == "-j" {
			return r.Args[i+1]
		}
	}
	return ""
}

// Verb is how the rule is added: "-I" when Pos is set, else "-A".
func (r Rule) Verb() string {
	if r.Pos > 0 {
		return "-I"
	}
	return "-A"
}

// Spec renders the rule with the given verb: "-A", "-I" (adds Pos, or 1
// when Pos is 0), "-D" or "-C" (no position: they match by rule spec).
func (r Rule) Spec(verb string) string {
	parts := []string{verb, r.Chain}
	if verb == "-I" {
		pos := r.Pos
		if pos < 1 {
			pos = 1
		}
		parts = append(parts, strconv.Itoa(pos))
	}
	return strings.Join(append(parts, r.Args...), " ")
}

// Ruleset is every rule of one family, in build order.
type Ruleset struct {
	Family Family
	Rules  []Rule
}

// builtinChains are never created or removed by us.
var builtinChains = map[string]bool{
	"INPUT": true, "OUTPUT": true, "FORWARD": true, "PREROUTING": true, "POSTROUTING": true,
}

// builtinTargets are jump targets that are not chains.
func isChainTarget(t string) bool {
	return strings.HasPrefix(t, "ISTIO_")
}

// IsOwnedChain reports whether chain is one Outrigger creates (ISTIO_*, the
// names Istio uses, so Istio's own cleanup and ours agree).
func IsOwnedChain(chain string) bool {
	return !builtinChains[chain] && strings.HasPrefix(chain, "ISTIO_")
}

// Tables returns the tables the ruleset touches, sorted as iptables-save
// sorts them (alphabetically).
func (rs *Ruleset) Tables() []string {
	seen := map[string]bool{}
	for _, r := range rs.Rules {
		seen[r.Table] = true
	}
	tables := make([]string, 0, len(seen))
	for t := range seen {
		tables = append(tables, t)
	}
	sort.Strings(tables)
	return tables
}

// Chains returns the owned chains of table in order of first appearance:
// first the chains rules live in, then chains that are only jumped to. This
// is the order Istio emits its -N lines in.
func (rs *Ruleset) Chains(table string) []string {
	var chains []string
	seen := map[string]bool{}
	add := func(c string) {
		if IsOwnedChain(c) && !seen[c] {
			seen[c] = true
			chains = append(chains, c)
		}
	}
	for _, r := range rs.Rules {
		if r.Table == table {
			add(r.Chain)
		}
	}
	for _, r := range rs.Rules {
		if r.Table == table && isChainTarget(r.Target()) {
			add(r.Target())
		}
	}
	return chains
}

// RestoreInput renders the ruleset as input for "iptables-restore --noflush":
// per table "* table", the -N lines, the rules, then COMMIT.
func (rs *Ruleset) RestoreInput() string {
	var b strings.Builder
	for _, table := range rs.Tables() {
		b.WriteString("* " + table + "\n")
		for _, c := range rs.Chains(table) {
			b.WriteString("-N " + c + "\n")
		}
		for _, r := range rs.Rules {
			if r.Table != table {
				continue
			}
			b.WriteString(r.Spec(r.Verb()) + "\n")
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// Render is the dry-run text of the plan: per family, a comment line naming
// the command, then its exact restore input; then the TPROXY policy routes
// and loopback addresses as comments. Comment lines are valid restore input,
// so each family's part can be fed to iptables-restore as is.
func (p *Plan) Render() string {
	var b strings.Builder
	for _, rs := range p.Rulesets() {
		cmd := "iptables-restore"
		if rs.Family == IPv6 {
			cmd = "ip6tables-restore"
		}
		b.WriteString("# " + rs.Family.String() + ": " + cmd + " --noflush\n")
		b.WriteString(rs.RestoreInput())
	}
	for _, a := range p.LoopbackAddrs {
		b.WriteString("# ip addr add " + a.String() + " dev lo\n")
	}
	for _, r := range p.Routes {
		flag := "-4"
		if r.Family == IPv6 {
			flag = "-6"
		}
		mark := strconv.FormatUint(uint64(r.Mark), 10)
		table := strconv.Itoa(r.Table)
		b.WriteString("# ip " + flag + " rule add fwmark " + mark + " lookup " + table + "\n")
		b.WriteString("# ip " + flag + " route add local default dev lo table " + table + "\n")
	}
	return b.String()
}
