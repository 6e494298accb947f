package iptables

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// ipBatch runs "ip -force -batch -" with lines: one exec for every route
// change. It returns the error messages of failed lines, minus those
// matching ignore (such as "File exists" when adding).
func ipBatch(ctx context.Context, r *runner, lines []string, ignore ...string) []string {
	if len(lines) == 0 {
		return nil
	}
	_, err := r.run(ctx, strings.Join(lines, "\n")+"\n", "ip", "-force", "-batch", "-")
	if err == nil {
		return nil
	}
	ee, ok := err.(*execError)
	if !ok {
		return []string{err.Error()}
	}
	var failed []string
next:
	for _, l := range strings.Split(ee.Stderr, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "Command failed") {
			continue
		}
		for _, ig := range ignore {
			if strings.Contains(l, ig) {
				continue next
			}
		}
		failed = append(failed, l)
	}
	if len(failed) == 0 && ee.Stderr == "" {
		failed = append(failed, err.Error())
	}
	return failed
}

func ipFamilyFlag(f Family) string {
	if f == IPv6 {
		return "-6"
	}
	return "-4"
}

func routeLines(verb string, rt PolicyRoute) []string {
	fam := ipFamilyFlag(rt.Family)
	mark, table := strconv.FormatUint(uint64(rt.Mark), 10), strconv.Itoa(rt.Table)
	routeVerb := verb
	if verb == "add" {
		// replace: the route may already be there from an earlier run.
		routeVerb = "replace"
	}
	return []string{
		fam + " rule " + verb + " fwmark " + mark + " lookup " + table,
		fam + " route " + routeVerb + " local default dev lo table " + table,
	}
}

// applyRoutes adds the loopback addresses and TPROXY policy routes. Ones
// already present are fine (a re-run).
func applyRoutes(ctx context.Context, r *runner, plan *Plan) error {
	var lines []string
	for _, a := range plan.LoopbackAddrs {
		lines = append(lines, "addr add "+a.String()+" dev lo")
	}
	for _, rt := range plan.Routes {
		lines = append(lines, routeLines("add", rt)...)
	}
	if failed := ipBatch(ctx, r, lines, "File exists"); len(failed) > 0 {
		return fmt.Errorf("policy routes for TPROXY (ip %s): %s", strings.Join(lines, "; "), strings.Join(failed, "; "))
	}
	return nil
}

// cleanupRoutes removes the fwmark rules and local routes for cfg's mark
// and table in both families (whatever the mode: a pod may have switched
// from TPROXY), and the loopback addresses the plan adds. Missing ones are
// not errors; neither is an IPv6-less kernel.
func cleanupRoutes(ctx context.Context, r *runner, cfg *Config, plan *Plan) error {
	seen := map[PolicyRoute]bool{}
	var lines []string
	add := func(rt PolicyRoute) {
		if !seen[rt] {
			seen[rt] = true
			lines = append(lines, routeLines("del", rt)...)
		}
	}
	for _, fam := range []Family{IPv4, IPv6} {
		add(PolicyRoute{Family: fam, Mark: cfg.InboundTProxyMark, Table: cfg.InboundTProxyRouteTable})
	}
	for _, rt := range plan.Routes {
		add(rt)
	}
	addrs := map[netip.Prefix]bool{}
	for _, a := range plan.LoopbackAddrs {
		addrs[a] = true
	}
	if cfg.EnableIPv6 || len(addrs) > 0 {
		addrs[passthroughV6] = true
	}
	for a := range addrs {
		lines = append(lines, "addr del "+a.String()+" dev lo")
	}
	failed := ipBatch(ctx, r, lines, "No such file", "No such process", "Cannot assign requested address",
		"not supported", "Cannot find device")
	if len(failed) > 0 {
		return fmt.Errorf("remove policy routes: %s", strings.Join(failed, "; "))
	}
	return nil
}
