package iptables

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strings"

	"go.uber.org/zap"
)

// Backend variants. The kernel runs both side by side: rules in either are
// evaluated, so what matters is that all of ours live in one, that the one
// chosen works in this kernel, and that we agree with what is already there.
const (
	variantLegacy = "legacy"
	variantNFT    = "nft"
)

// backend is one iptables flavour for one family: its three tools.
type backend struct {
	Variant string // variantLegacy or variantNFT
	Family  Family
	Bin     string // iptables-nft, ip6tables-legacy, ... (absolute path)
	Save    string
	Restore string
}

func (b *backend) String() string {
	return familyPrefix(b.Family) + "-" + b.Variant
}

func familyPrefix(f Family) string {
	if f == IPv6 {
		return "ip6tables"
	}
	return "iptables"
}

// restoreArgs are the flags for one atomic "<backend>-restore --noflush".
// Legacy takes the xtables lock (--wait, as Istio passes for legacy);
// nft needs none.
func (b *backend) restoreArgs() []string {
	if b.Variant == variantLegacy {
		return []string{"--noflush", "--wait"}
	}
	return []string{"--noflush"}
}

// findBackends lists the usable tool sets of a family: iptables-legacy and
// iptables-nft when installed; otherwise plain iptables, whose variant is
// read from "iptables --version".
func findBackends(ctx context.Context, r *runner, fam Family) []*backend {
	prefix := familyPrefix(fam)
	var out []*backend
	for _, v := range []string{variantLegacy, variantNFT} {
		b, err := lookBackend(fam, v, prefix+"-"+v)
		if err == nil {
			out = append(out, b)
		}
	}
	if len(out) > 0 {
		return out
	}
	ver, err := r.run(ctx, "", prefix, "--version")
	if err != nil {
		return nil
	}
	v := variantLegacy
	if strings.Contains(ver, "nf_tables") {
		v = variantNFT
	}
	if b, err := lookBackend(fam, v, prefix); err == nil {
		return []*backend{b}
	}
	return nil
}

func lookBackend(fam Family, variant, base string) (*backend, error) {
	b := &backend{Variant: variant, Family: fam}
	for _, t := range []struct {
		dst  *string
		name string
	}{{&b.Bin, base}, {&b.Save, base + "-save"}, {&b.Restore, base + "-restore"}} {
		p, err := exec.LookPath(t.name)
		if err != nil {
			return nil, err
		}
		*t.dst = p
	}
	return b, nil
}

// backendState is what one backend holds in the namespace.
type backendState struct {
	B   *backend
	St  *savedState
	Raw string // the save output, for the final-state log
	Err error  // the save failed: the backend does not work here
}

// readState runs <backend>-save. For legacy it first reads
// /proc/net/ip{,6}_tables_names: with no legacy table in the namespace
// there is nothing to save, and not running the tool keeps it from
// loading modules or creating tables.
func readState(ctx context.Context, r *runner, b *backend) *backendState {
	bs := &backendState{B: b}
	if b.Variant == variantLegacy {
		names := "ip_tables_names"
		if b.Family == IPv6 {
			names = "ip6_tables_names"
		}
		if s, err := readNetFile(names); err != nil || strings.TrimSpace(s) == "" {
			bs.St = &savedState{}
			return bs
		}
	}
	out, err := r.run(ctx, "", b.Save)
	if err != nil {
		bs.Err = err
		return bs
	}
	bs.Raw = out
	if bs.St, err = parseSave(out); err != nil {
		bs.Err = fmt.Errorf("%s: %w", b.Save, err)
	}
	return bs
}

// choice is the backend picked for a family and why.
type choice struct {
	*backendState
	Reason string
	// Pinned means the choice follows from the flag or from rules already
	// in the namespace; an unpinned choice may fall back to the other
	// variant when the kernel lacks support for the first.
	Pinned bool
}

// chooseBackend decides where a family's rules go:
//  1. --force-iptables-binary, if set;
//  2. the backend that already holds ISTIO_* chains (a re-run or a
//     reconcile must change the rules where they are);
//  3. the backend that holds any rules at all: the pod's other tooling
//     uses it, so the kernel is known to support it. Empty tables do not
//     count: a probe such as "iptables-legacy -t nat -L" creates them, and
//     letting that decide is the bug behind leftover rules (Istio's probe);
//  4. nft if its tools work here, else legacy.
//
// Where both qualify, nft wins: it is what current distributions and
// kube-proxy default to.
func chooseBackend(force string, states []*backendState) (choice, error) {
	if len(states) == 0 {
		return choice{}, errors.New("no iptables tools found on PATH (need iptables-nft or iptables-legacy, with -save and -restore)")
	}
	by := func(v string) *backendState {
		for _, s := range states {
			if s.B.Variant == v {
				return s
			}
		}
		return nil
	}
	if force != "" {
		s := by(force)
		if s == nil {
			return choice{}, fmt.Errorf("--force-iptables-binary=%s: %s-%s and its -save/-restore are not on PATH", force, familyPrefix(states[0].B.Family), force)
		}
		return choice{backendState: s, Reason: "forced by --force-iptables-binary", Pinned: true}, nil
	}
	pick := func(pred func(*backendState) bool) []*backendState {
		var out []*backendState
		for _, s := range states {
			if s.Err == nil && pred(s) {
				out = append(out, s)
			}
		}
		return out
	}
	prefer := func(c []*backendState) *backendState {
		for _, s := range c {
			if s.B.Variant == variantNFT {
				return s
			}
		}
		return c[0]
	}
	if c := pick(func(s *backendState) bool { return s.St.hasOwned() }); len(c) > 0 {
		reason := "it holds the existing ISTIO_* chains"
		if len(c) > 1 {
			reason = "both backends hold ISTIO_* chains; nft is preferred and the other copy is removed"
		}
		return choice{backendState: prefer(c), Reason: reason, Pinned: true}, nil
	}
	if c := pick(func(s *backendState) bool { return s.St.ruleCount() > 0 }); len(c) > 0 {
		s := prefer(c)
		reason := fmt.Sprintf("it holds the namespace's existing rules (%d)", s.St.ruleCount())
		if len(c) > 1 {
			reason = "both backends hold rules; nft is preferred"
		}
		return choice{backendState: s, Reason: reason, Pinned: true}, nil
	}
	if c := pick(func(*backendState) bool { return true }); len(c) > 0 {
		s := prefer(c)
		reason := "no rules in any backend; " + s.B.Variant + " works here"
		if s.B.Variant != variantNFT {
			if n := by(variantNFT); n != nil {
				reason = fmt.Sprintf("no rules in any backend; nft does not work here (%v)", n.Err)
			}
		}
		return choice{backendState: s, Reason: reason}, nil
	}
	return choice{}, fmt.Errorf("no iptables backend works in this network namespace: %w", states[0].Err)
}

// ErrKernelSupport marks an apply that failed because the kernel lacks a
// table or nf_tables: the error text names the module to load.
var ErrKernelSupport = errors.New("kernel support missing")

var tableRe = regexp.MustCompile("table [`'\"]?([a-z]+)")

// kernelSupportError turns "can't initialize iptables table `nat'" and the
// nf_tables equivalents into one error that names the module to load, or
// returns nil when err is something else.
func kernelSupportError(b *backend, err error) error {
	var ee *execError
	if !errors.As(err, &ee) || permissionError(b, err) != nil {
		// "Could not fetch rule set generation id: Permission denied" is
		// a missing capability, not a missing module.
		return nil
	}
	msg := ee.Stderr
	switch {
	case strings.Contains(msg, "initialize") && strings.Contains(msg, "table"),
		strings.Contains(msg, "do you need to insmod"):
		table := "nat"
		if m := tableRe.FindStringSubmatch(msg); m != nil {
			table = m[1]
		}
		mod := "iptable_" + table
		if b.Family == IPv6 {
			mod = "ip6table_" + table
		}
		if b.Variant == variantNFT {
			mod = "nf_tables and nft_chain_nat"
		}
		return fmt.Errorf("%w: %s cannot use the %s table: load the kernel module %s on the node (modprobe %s), or pick the other backend with --force-iptables-binary: %s",
			ErrKernelSupport, b, table, mod, strings.Fields(mod)[0], strings.TrimSpace(msg))
	case b.Variant == variantNFT && (strings.Contains(msg, "generation id") ||
		strings.Contains(msg, "not supported") || strings.Contains(msg, "Protocol not supported")):
		return fmt.Errorf("%w: %s does not work in this kernel: load the kernel modules nf_tables and nft_chain_nat on the node (modprobe nf_tables), or use --force-iptables-binary=legacy: %s",
			ErrKernelSupport, b, strings.TrimSpace(msg))
	}
	return nil
}

// ErrPermission marks an iptables tool the kernel refused: the command
// runs without root or without the NET_ADMIN capability.
var ErrPermission = errors.New("not permitted to change the network namespace's rules")

// permissionError turns "Permission denied (you must be root)" and
// "Operation not permitted" from an iptables tool into one error that says
// what the container needs, or returns nil when err is something else. It
// keeps a refused tool from passing for one that does not work in this
// kernel (which would move the rules to the other backend, or let a
// cleanup that read nothing report success).
func permissionError(b *backend, err error) error {
	var ee *execError
	if !errors.As(err, &ee) {
		return nil
	}
	msg := ee.Stderr
	if !strings.Contains(msg, "Permission denied") && !strings.Contains(msg, "Operation not permitted") && !strings.Contains(msg, "you must be root") {
		return nil
	}
	return fmt.Errorf("%w: %s: %s: run istio-iptables as root with the NET_ADMIN and NET_RAW capabilities, as Istio's istio-init container (runAsUser: 0, capabilities.add: [NET_ADMIN, NET_RAW])",
		ErrPermission, b, strings.TrimSpace(msg))
}

func logChoice(log *zap.Logger, c choice, states []*backendState) {
	fields := []zap.Field{zap.String("backend", c.B.String()), zap.String("reason", c.Reason)}
	for _, s := range states {
		fields = append(fields, zap.Int(s.B.Variant+"_rules", s.St.ruleCount()))
	}
	log.Info("iptables backend chosen", fields...)
}
