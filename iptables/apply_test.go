package iptables

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/outrigger-mesh/outrigger/internal/netstate"
)

// These tests run the real iptables tools against the kernel in a fresh
// network namespace per case; they need root and skip without it.

var kernelNetnsSeq atomic.Int64

// kernelNetns creates a throw-away network namespace and returns its path.
func kernelNetns(t testing.TB) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: real iptables in a network namespace")
	}
	for _, c := range []string{"ip", "iptables-legacy-restore", "iptables-nft-restore"} {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("needs %s", c)
		}
	}
	name := fmt.Sprintf("or-k-%d-%d", os.Getpid(), kernelNetnsSeq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	nsRun(t, name, "ip", "link", "set", "lo", "up")
	return "/run/netns/" + name
}

func nsName(path string) string { return strings.TrimPrefix(path, "/run/netns/") }

func nsRun(t testing.TB, ns string, args ...string) string {
	t.Helper()
	out, err := nsRunErr(ns, args...)
	if err != nil {
		t.Fatalf("%s: %v", strings.Join(args, " "), err)
	}
	return out
}

// snapshot is everything a run may touch, as text (see netstate).
func snapshot(t testing.TB, ns string) string {
	t.Helper()
	return netstate.Snapshot(func(name string, args ...string) (string, error) {
		return nsRunErr(ns, append([]string{name}, args...)...)
	})
}

func nsRunErr(ns string, args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", nsName(ns)}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%w: %s", err, stderr.String())
	}
	return string(out), nil
}

func testLogger() (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zap.DebugLevel)
	return zap.New(core), logs
}

// TestKernelGoldenCases applies every golden case to a real kernel on both
// backends and checks: the saved state equals the plan in canonical form
// (so a re-run recognises its own rules), a re-run changes nothing, and a
// cleanup restores the namespace.
func TestKernelGoldenCases(t *testing.T) {
	cases := goldenCases
	if testing.Short() {
		cases = cases[:4]
	}
	for _, variant := range []string{variantNFT, variantLegacy} {
		for _, c := range cases {
			t.Run(variant+"/"+c.name, func(t *testing.T) {
				if len(c.env[EnvOwnerGroupsInclude]+c.env[EnvOwnerGroupsExclude]) > 0 {
					t.Skip("group names (java, ftp) do not resolve on this host; iptables rejects them")
				}
				ns := kernelNetns(t)
				// Foreign rules in every table the plan may touch, in both
				// backends, so the tables exist before and the comparison
				// also proves the foreign rules survive untouched.
				seedForeignRules(t, ns)
				before := snapshot(t, ns)

				cfg := configFor(t, c)
				cfg.NetworkNamespace, cfg.ForceIptablesBinary = ns, variant
				plan, err := Build(cfg)
				if err != nil {
					t.Fatal(err)
				}
				log, logs := testLogger()
				ctx := context.Background()
				if err := Execute(ctx, cfg, plan, log); err != nil {
					t.Fatalf("apply: %v", err)
				}
				for _, rs := range plan.Rulesets() {
					st := saveState(t, ns, familyPrefix(rs.Family)+"-"+variant+"-save")
					if d := diffState(st, expectRuleset(rs)); d != "" {
						t.Errorf("%s state differs from the plan: %s", rs.Family, d)
					}
				}
				applied := snapshot(t, ns)
				if applied == before {
					t.Fatal("apply changed nothing")
				}

				if err := Execute(ctx, cfg, plan, log); err != nil {
					t.Fatalf("re-run: %v", err)
				}
				if got := logs.FilterMessageSnippet("already applied").Len(); got != len(plan.Rulesets()) {
					t.Errorf("re-run: %d families reported already applied, want %d", got, len(plan.Rulesets()))
				}
				if d := cmp.Diff(applied, snapshot(t, ns)); d != "" {
					t.Errorf("re-run changed the state (-first +second):\n%s", d)
				}

				cfg.CleanupOnly = true
				if err := Execute(ctx, cfg, plan, log); err != nil {
					t.Fatalf("cleanup: %v", err)
				}
				if d := cmp.Diff(before, snapshot(t, ns)); d != "" {
					t.Errorf("cleanup did not restore the namespace (-before +after):\n%s", d)
				}
			})
		}
	}
}

// seedForeignRules adds one rule that is not ours to every table in both
// backends and families.
func seedForeignRules(t testing.TB, ns string) {
	t.Helper()
	for _, bin := range []string{"iptables-legacy", "iptables-nft", "ip6tables-legacy", "ip6tables-nft"} {
		var in strings.Builder
		for _, table := range []string{"filter", "mangle", "nat", "raw"} {
			chain := "OUTPUT"
			fmt.Fprintf(&in, "*%s\n-A %s -p tcp --dport 9 -j ACCEPT\nCOMMIT\n", table, chain)
		}
		cmd := exec.Command("ip", "netns", "exec", nsName(ns), bin+"-restore", "--noflush")
		cmd.Stdin = strings.NewReader(in.String())
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s-restore: %v: %s", bin, err, out)
		}
	}
}

func saveState(t testing.TB, ns, tool string) *savedState {
	t.Helper()
	st, err := parseSave(nsRun(t, ns, tool))
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func mustBuild(t testing.TB, cfg *Config) *Plan {
	t.Helper()
	plan, err := Build(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return plan
}

// checkState asserts that each family's rules in the backend equal plan.
func checkState(t testing.TB, ns, variant string, plan *Plan) {
	t.Helper()
	for _, rs := range plan.Rulesets() {
		st := saveState(t, ns, familyPrefix(rs.Family)+"-"+variant+"-save")
		if d := diffState(st, expectRuleset(rs)); d != "" {
			t.Errorf("%s %s: state differs from the plan: %s", variant, rs.Family, d)
		}
	}
}

// TestKernelReconcile changes flags between runs (REDIRECT to TPROXY and
// back, other ports) and checks that the state is exactly the new plan
// each time, and that a cleanup afterwards restores the namespace.
func TestKernelReconcile(t *testing.T) {
	steps := []goldenCase{
		{name: "default", args: injectorArgs},
		{name: "tproxy-dns", args: append(append([]string{}, injectorArgs...), "-m", "TPROXY", "--redirect-dns", "-c", "eth9"), dns: []string{"10.96.0.10"}, ipv6: true},
		{name: "other-ports", args: append(append([]string{}, injectorArgs...), "-d", "15090", "-q", "8080", "-x", "10.0.0.0/8")},
	}
	for _, variant := range []string{variantNFT, variantLegacy} {
		t.Run(variant, func(t *testing.T) {
			ns := kernelNetns(t)
			seedForeignRules(t, ns)
			before := snapshot(t, ns)
			ctx := context.Background()
			var cfg *Config
			var plan *Plan
			for _, s := range steps {
				cfg = configFor(t, s)
				cfg.NetworkNamespace, cfg.ForceIptablesBinary = ns, variant
				plan = mustBuild(t, cfg)
				log, logs := testLogger()
				if err := Execute(ctx, cfg, plan, log); err != nil {
					t.Fatalf("%s: %v", s.name, err)
				}
				checkState(t, ns, variant, plan)
				if s.name != steps[0].name && logs.FilterMessageSnippet("reconciling").Len() == 0 {
					t.Errorf("%s: no reconcile logged", s.name)
				}
			}
			// The reconciles must have removed the -c eth9 RETURNs and the
			// TPROXY marks of step 2 although the later flags know nothing of
			// them; the cleanup then finds the rest from the state.
			cfg.CleanupOnly = true
			log, _ := testLogger()
			if err := Execute(ctx, cfg, plan, log); err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(before, snapshot(t, ns)); d != "" {
				t.Errorf("reconcile+cleanup left state behind (-before +after):\n%s", d)
			}
		})
	}
}

// TestKernelFailedRestoreLeavesNothing injects a bad rule into the last
// table of a plan: the earlier tables were already committed by the
// restore, and must be rolled back. A bad IPv6 rule must also undo IPv4.
func TestKernelFailedRestoreLeavesNothing(t *testing.T) {
	bad := Rule{Table: "raw", Chain: "ISTIO_OUTPUT_DNS", Args: []string{"-p", "tcp", "--no-such-option", "1", "-j", "RETURN"}}
	for _, variant := range []string{variantNFT, variantLegacy} {
		for _, fam := range []Family{IPv4, IPv6} {
			t.Run(variant+"/"+fam.String(), func(t *testing.T) {
				ns := kernelNetns(t)
				seedForeignRules(t, ns)
				before := snapshot(t, ns)
				cfg := configFor(t, goldenCase{args: injectorArgs, ipv6: true})
				cfg.NetworkNamespace, cfg.ForceIptablesBinary = ns, variant
				plan := mustBuild(t, cfg)
				rs := plan.V4
				if fam == IPv6 {
					rs = plan.V6
				}
				rs.Rules = append(rs.Rules, bad)
				log, _ := testLogger()
				err := Execute(context.Background(), cfg, plan, log)
				if err == nil || !strings.Contains(err.Error(), "--no-such-option") {
					t.Fatalf("err = %v, want the restore's complaint about the bad rule", err)
				}
				if d := cmp.Diff(before, snapshot(t, ns)); d != "" {
					t.Errorf("a failed apply left state behind (-before +after):\n%s", d)
				}
			})
		}
	}
}

// TestKernelOtherBackendResidue: rules left in legacy by an earlier run are
// removed when the rules move to nft, and a cleanup without
// --force-iptables-binary cleans both backends.
func TestKernelOtherBackendResidue(t *testing.T) {
	ns := kernelNetns(t)
	seedForeignRules(t, ns)
	before := snapshot(t, ns)
	ctx := context.Background()
	cfg := configFor(t, goldenCase{args: injectorArgs})
	cfg.NetworkNamespace = ns
	plan := mustBuild(t, cfg)
	log, _ := testLogger()

	cfg.ForceIptablesBinary = variantLegacy
	if err := Execute(ctx, cfg, plan, log); err != nil {
		t.Fatal(err)
	}
	cfg.ForceIptablesBinary = variantNFT
	if err := Execute(ctx, cfg, plan, log); err != nil {
		t.Fatal(err)
	}
	checkState(t, ns, variantNFT, plan)
	if st := saveState(t, ns, "iptables-legacy-save"); st.hasOwned() {
		t.Errorf("legacy still holds ISTIO_* state after the move to nft")
	}

	// Now leave a copy in legacy too (as two tools fighting would) and
	// clean without naming a backend.
	cfg.ForceIptablesBinary = ""
	nsRestore(t, ns, "iptables-legacy-restore", plan.V4.RestoreInput())
	cfg.CleanupOnly = true
	if err := Execute(ctx, cfg, plan, log); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(before, snapshot(t, ns)); d != "" {
		t.Errorf("cleanup left state behind (-before +after):\n%s", d)
	}
}

// TestKernelEmptyLegacyTableDoesNotDecide is Istio's leftover bug: a probe
// creates an empty legacy nat table; that must not send the rules (or the
// cleanup) to legacy.
func TestKernelEmptyLegacyTableDoesNotDecide(t *testing.T) {
	ns := kernelNetns(t)
	nsRun(t, ns, "iptables-legacy", "-t", "nat", "-L", "-n")
	cfg := configFor(t, goldenCase{args: injectorArgs})
	cfg.NetworkNamespace = ns
	plan := mustBuild(t, cfg)
	log, logs := testLogger()
	if err := Execute(context.Background(), cfg, plan, log); err != nil {
		t.Fatal(err)
	}
	checkState(t, ns, variantNFT, plan)
	chosen := logs.FilterMessage("iptables backend chosen").All()
	if len(chosen) != 1 || chosen[0].ContextMap()["backend"] != "iptables-nft" {
		t.Errorf("backend log = %v, want iptables-nft", chosen)
	}
	cfg.CleanupOnly = true
	if err := Execute(context.Background(), cfg, plan, log); err != nil {
		t.Fatal(err)
	}
	if st := saveState(t, ns, "iptables-nft-save"); st.hasOwned() {
		t.Error("cleanup left ISTIO_* state in nft")
	}
}

func nsRestore(t testing.TB, ns, tool, input string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", nsName(ns), tool, "--noflush")
	cmd.Stdin = strings.NewReader(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", tool, err, out)
	}
}

// kernelTables lists the tables that exist in the namespace: legacy's per
// family (from /proc/net) and nft's. snapshot leaves empty tables out, so
// it cannot see a run that creates one.
func kernelTables(t testing.TB, ns string) string {
	t.Helper()
	var b strings.Builder
	for _, f := range []string{"/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"} {
		out, _ := nsRunErr(ns, "cat", f)
		fields := strings.Fields(out)
		slices.Sort(fields)
		fmt.Fprintf(&b, "%s: %v\n", f, fields)
	}
	out, _ := nsRunErr(ns, "nft", "list", "tables")
	fmt.Fprintf(&b, "nft: %s", out)
	return b.String()
}

// TestKernelCleanupWithOtherFlagsCreatesNoTable: a cleanup is derived from
// the kernel's state, so it may run with other flags than the apply. Rules
// those flags would have put in a table that does not exist cannot be
// there, and looking for them ("iptables-legacy -t mangle -C") must not
// create the table: an empty legacy table left behind is what makes
// Istio's backend detection pick the wrong backend (pain point #4).
func TestKernelCleanupWithOtherFlagsCreatesNoTable(t *testing.T) {
	for _, variant := range []string{variantNFT, variantLegacy} {
		t.Run(variant, func(t *testing.T) {
			ns := kernelNetns(t)
			ctx := context.Background()
			log, _ := testLogger()
			cfg := configFor(t, goldenCase{args: injectorArgs})
			cfg.NetworkNamespace, cfg.ForceIptablesBinary = ns, variant
			if err := Execute(ctx, cfg, mustBuild(t, cfg), log); err != nil {
				t.Fatal(err)
			}
			applied := kernelTables(t, ns)

			other := configFor(t, goldenCase{args: append(append([]string{}, injectorArgs...), "-m", "TPROXY", "-c", "eth9", "--drop-invalid")})
			other.NetworkNamespace, other.CleanupOnly = ns, true
			if err := Execute(ctx, other, mustBuild(t, other), log); err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(applied, kernelTables(t, ns)); d != "" {
				t.Errorf("cleanup created tables (-after apply +after cleanup):\n%s", d)
			}
			for _, tool := range []string{"iptables-legacy-save", "iptables-nft-save"} {
				if st := saveState(t, ns, tool); st.hasOwned() {
					t.Errorf("%s: cleanup left ISTIO_* state", tool)
				}
			}
		})
	}
}

// TestKernelForceApply: --force-apply rewrites rules that are already in
// place (one restore, no "already applied"), and the result is still
// exactly the plan, with no duplicate.
func TestKernelForceApply(t *testing.T) {
	ns := kernelNetns(t)
	ctx := context.Background()
	cfg := configFor(t, goldenCase{args: injectorArgs})
	cfg.NetworkNamespace = ns
	plan := mustBuild(t, cfg)
	log, _ := testLogger()
	if err := Execute(ctx, cfg, plan, log); err != nil {
		t.Fatal(err)
	}
	applied := snapshot(t, ns)
	cfg.ForceApply = true
	log, logs := testLogger()
	if err := Execute(ctx, cfg, plan, log); err != nil {
		t.Fatal(err)
	}
	if logs.FilterMessageSnippet("already applied").Len() != 0 {
		t.Error("--force-apply skipped the apply")
	}
	restores := 0
	for _, e := range logs.FilterMessage("exec").All() {
		if strings.HasSuffix(fmt.Sprint(e.ContextMap()["cmd"]), "-restore") {
			restores++
		}
	}
	if restores != 1 {
		t.Errorf("--force-apply ran %d restores, want 1", restores)
	}
	checkState(t, ns, variantNFT, plan)
	if d := cmp.Diff(applied, snapshot(t, ns)); d != "" {
		t.Errorf("--force-apply changed the rules (-before +after):\n%s", d)
	}
}

// TestKernelCleanupTProxyRoutesFromState: an apply with a non-default
// TPROXY mark and table, then --cleanup-only with the default flags. The
// policy rules and the local route are found from the marks our ISTIO_*
// rules set, so the namespace ends as it started. Foreign policy rules, one
// with our mark but another selector and one with another mark, survive
// (the snapshot comparison covers them), as do their routes, and a table's
// route stays while a foreign rule still looks the table up.
func TestKernelCleanupTProxyRoutesFromState(t *testing.T) {
	foreign := [][]string{
		{"ip", "-4", "rule", "add", "from", "10.1.0.0/16", "fwmark", "1338", "lookup", "201"},
		{"ip", "-4", "rule", "add", "fwmark", "99", "lookup", "200"},
		{"ip", "-4", "route", "add", "local", "default", "dev", "lo", "table", "200"},
		{"ip", "-6", "rule", "add", "fwmark", "1338/0xff", "lookup", "202"},
		{"ip", "-6", "rule", "add", "fwmark", "99", "lookup", "200"},
		// Table 134's route is also another rule's: it must stay.
		{"ip", "-4", "rule", "add", "fwmark", "77", "lookup", "134"},
		{"ip", "-4", "route", "add", "local", "default", "dev", "lo", "table", "134"},
	}
	for _, variant := range []string{variantNFT, variantLegacy} {
		t.Run(variant, func(t *testing.T) {
			ns := kernelNetns(t)
			seedForeignRules(t, ns)
			for _, c := range foreign {
				nsRun(t, ns, c...)
			}
			before := snapshot(t, ns)
			ctx := context.Background()
			log, _ := testLogger()

			cfg := configFor(t, goldenCase{args: append(append([]string{}, injectorArgs...), "-m", "TPROXY", "-t", "1338", "-r", "134"), ipv6: true})
			cfg.NetworkNamespace, cfg.ForceIptablesBinary = ns, variant
			if err := Execute(ctx, cfg, mustBuild(t, cfg), log); err != nil {
				t.Fatalf("apply: %v", err)
			}
			for _, fam := range []string{"-4", "-6"} {
				if out := nsRun(t, ns, "ip", fam, "rule", "show", "table", "134"); !strings.Contains(out, "fwmark 0x53a lookup 134") {
					t.Fatalf("ip %s rule after apply: %q, want fwmark 0x53a lookup 134", fam, out)
				}
			}

			other := configFor(t, goldenCase{args: injectorArgs})
			other.NetworkNamespace, other.CleanupOnly = ns, true
			if err := Execute(ctx, other, mustBuild(t, other), log); err != nil {
				t.Fatalf("cleanup: %v", err)
			}
			if d := cmp.Diff(before, snapshot(t, ns)); d != "" {
				t.Errorf("cleanup with default flags left state behind (-before +after):\n%s", d)
			}
		})
	}
}
