package iptables

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
)

// ipBatch runs "ip -4|-6 -force -batch -" with lines: one exec for all of
// a family's changes. It returns the error messages of failed lines.
func ipBatch(ctx context.Context, r *runner, fam Family, lines []string) []string {
	if len(lines) == 0 {
		return nil
	}
	flag := "-4"
	if fam == IPv6 {
		flag = "-6"
	}
	_, err := r.run(ctx, strings.Join(lines, "\n")+"\n", "ip", flag, "-force", "-batch", "-")
	if err == nil {
		return nil
	}
	ee, ok := err.(*execError)
	if !ok || strings.TrimSpace(ee.Stderr) == "" {
		return []string{err.Error()}
	}
	var failed []string
	for _, l := range strings.Split(ee.Stderr, "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "Command failed") {
			failed = append(failed, l)
		}
	}
	return failed
}

func ruleLine(verb string, rt PolicyRoute) string {
	return fmt.Sprintf("rule %s fwmark %d lookup %d", verb, rt.Mark, rt.Table)
}

func routeLine(verb string, rt PolicyRoute) string {
	return fmt.Sprintf("route %s local default dev lo table %d", verb, rt.Table)
}

// applyRoutes adds the loopback addresses and TPROXY policy routes that
// are missing (the kernel would accept a duplicate rule, so it checks
// first): nothing at all on a re-run.
func applyRoutes(ctx context.Context, r *runner, plan *Plan) error {
	lines := map[Family][]string{}
	for _, a := range plan.LoopbackAddrs {
		if !hasLoopbackAddr(a) {
			fam := IPv4
			if a.Addr().Is6() {
				fam = IPv6
			}
			lines[fam] = append(lines[fam], "addr replace "+a.String()+" dev lo nodad")
		}
	}
	for _, rt := range plan.Routes {
		if countFwmarkRules(rt) == 0 {
			lines[rt.Family] = append(lines[rt.Family], ruleLine("add", rt))
		}
		if !hasLocalDefault(rt) {
			lines[rt.Family] = append(lines[rt.Family], routeLine("replace", rt))
		}
	}
	for _, fam := range []Family{IPv4, IPv6} {
		if failed := ipBatch(ctx, r, fam, lines[fam]); len(failed) > 0 {
			return fmt.Errorf("%s policy routes for TPROXY (ip %s): %s", fam, strings.Join(lines[fam], "; "), strings.Join(failed, "; "))
		}
	}
	// The kernel routes a new IPv6 address locally only a moment after
	// adding it; wait so that the pod's first connection finds it.
	for _, a := range plan.LoopbackAddrs {
		for i := 0; i < 200 && !hasLocalRoute(a.Addr()); i++ {
			time.Sleep(time.Millisecond)
		}
	}
	return nil
}

// cleanupRoutes removes, in both families (whatever the mode: a pod may
// have switched from TPROXY), every plain "from all fwmark M lookup T" rule
// whose mark is one that our ISTIO_* rules set (marks, read from the
// iptables state before it was removed, so a cleanup with default flags
// finds an apply's -t/-r), plus every copy of the rule the flags name
// (cfg's mark and table, and the plan's routes); then the "local default
// dev lo" route of each table those rules looked up, unless another rule
// still looks that table up; and the loopback addresses the plan adds.
// Rules with another mark, or with a selector we never add, are not
// touched. It only execs "ip" when there is something to remove.
func cleanupRoutes(ctx context.Context, r *runner, cfg *Config, plan *Plan, marks map[uint32]bool, log *zap.Logger) error {
	named := map[PolicyRoute]bool{}
	for _, rt := range plan.Routes {
		named[rt] = true
	}
	lines := map[Family][]string{}
	for _, fam := range []Family{IPv4, IPv6} {
		named[PolicyRoute{Family: fam, Mark: cfg.InboundTProxyMark, Table: cfg.InboundTProxyRouteTable}] = true
		tables := map[int]bool{} // tables whose local route may go
		for rt := range named {
			if rt.Family == fam {
				tables[rt.Table] = true
			}
		}
		kept := map[int]bool{} // tables a rule we keep looks up
		for _, pr := range policyRules(fam) {
			if pr.Plain && (marks[pr.Mark] || named[PolicyRoute{Family: fam, Mark: pr.Mark, Table: pr.Table}]) {
				lines[fam] = append(lines[fam], fmt.Sprintf("rule del pref %d fwmark %d lookup %d", pr.Pref, pr.Mark, pr.Table))
				tables[pr.Table] = true
				continue
			}
			kept[pr.Table] = true
		}
		for _, table := range slices.Sorted(maps.Keys(tables)) {
			rt := PolicyRoute{Family: fam, Table: table}
			if !kept[table] && !reservedTable(table) && hasLocalDefault(rt) {
				lines[fam] = append(lines[fam], routeLine("del", rt))
			}
		}
	}
	if n := len(lines[IPv4]) + len(lines[IPv6]); n > 0 {
		log.Info("removing TPROXY policy routes", zap.Strings("ipv4", lines[IPv4]), zap.Strings("ipv6", lines[IPv6]))
	}
	addrs := append(plan.LoopbackAddrs[:len(plan.LoopbackAddrs):len(plan.LoopbackAddrs)], passthroughV6)
	done := map[string]bool{}
	for _, a := range addrs {
		if !done[a.String()] && hasLoopbackAddr(a) {
			done[a.String()] = true
			fam := IPv4
			if a.Addr().Is6() {
				fam = IPv6
			}
			lines[fam] = append(lines[fam], "addr del "+a.String()+" dev lo")
		}
	}
	var errs []string
	for _, fam := range []Family{IPv4, IPv6} {
		if failed := ipBatch(ctx, r, fam, lines[fam]); len(failed) > 0 {
			errs = append(errs, fmt.Sprintf("%s: %s", fam, strings.Join(failed, "; ")))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("remove policy routes: %s", strings.Join(errs, "; "))
	}
	return nil
}

// reservedTable reports the kernel's own tables (unspec, default, main,
// local), whose routes a cleanup never removes.
func reservedTable(t int) bool {
	return t == 0 || t >= 253 && t <= 255
}
