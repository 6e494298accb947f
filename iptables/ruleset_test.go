package iptables

import (
	"strings"
	"testing"
)

func TestRuleSpec(t *testing.T) {
	r := Rule{Table: "mangle", Chain: "ISTIO_INBOUND", Pos: 3, Args: []string{"-p", "tcp", "-i", "lo", "-j", "RETURN"}}
	for verb, want := range map[string]string{
		"-I": "-I ISTIO_INBOUND 3 -p tcp -i lo -j RETURN",
		"-A": "-A ISTIO_INBOUND -p tcp -i lo -j RETURN",
		"-C": "-C ISTIO_INBOUND -p tcp -i lo -j RETURN",
		"-D": "-D ISTIO_INBOUND -p tcp -i lo -j RETURN",
	} {
		if got := r.Spec(verb); got != want {
			t.Errorf("Spec(%s) = %q, want %q", verb, got, want)
		}
	}
	if r.Verb() != "-I" || (Rule{}).Verb() != "-A" {
		t.Errorf("Verb: %q %q", r.Verb(), (Rule{}).Verb())
	}
	if got := (Rule{Chain: "PREROUTING", Args: []string{"-j", "X"}}).Spec("-I"); got != "-I PREROUTING 1 -j X" {
		t.Errorf("insert without Pos = %q", got)
	}
	if r.Target() != "RETURN" {
		t.Errorf("Target = %q", r.Target())
	}
}

func TestBuildRejectsUnusableConfig(t *testing.T) {
	if _, err := Build(nil); err == nil {
		t.Error("nil config built")
	}
	for name, mutate := range map[string]func(*Config){
		"ProxyPort":            func(c *Config) { c.ProxyPort = 0 },
		"Mode":                 func(c *Config) { c.Mode = "BPF" },
		"HostIPv4LoopbackCIDR": func(c *Config) { c.HostIPv4LoopbackCIDR = Config{}.HostIPv4LoopbackCIDR },
		"ProxyUIDs":            func(c *Config) { c.ProxyUIDs = nil },
	} {
		cfg := DefaultConfig()
		mutate(&cfg)
		if _, err := Build(&cfg); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: error %v does not name the field", name, err)
		}
	}
}

func TestBuildPlanRoutes(t *testing.T) {
	cfg := DefaultConfig()
	plan, err := Build(&cfg)
	if err != nil {
		t.Fatal(err)
	}
	if plan.V6 != nil || len(plan.Routes) != 0 || len(plan.LoopbackAddrs) != 0 || len(plan.Rulesets()) != 1 {
		t.Fatalf("REDIRECT v4 plan has extras: %+v", plan)
	}
	cfg.Mode, cfg.EnableIPv6, cfg.InboundTProxyMark, cfg.InboundTProxyRouteTable = ModeTPROXY, true, 7, 70
	plan, err = Build(&cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := []PolicyRoute{{IPv4, 7, 70}, {IPv6, 7, 70}}
	if len(plan.Routes) != 2 || plan.Routes[0] != want[0] || plan.Routes[1] != want[1] {
		t.Errorf("routes %+v, want %+v", plan.Routes, want)
	}
	if len(plan.LoopbackAddrs) != 1 || plan.LoopbackAddrs[0].String() != "::6/128" {
		t.Errorf("loopback addrs %v", plan.LoopbackAddrs)
	}
	if plan.V6 == nil || plan.V6.Family != IPv6 || plan.V4.Family != IPv4 {
		t.Errorf("families: %+v", plan)
	}
}

// Build runs on every pod start.
func BenchmarkBuildDefaultInjection(b *testing.B) {
	cfg := DefaultConfig()
	cfg.InboundPortsAll = true
	cfg.InboundPortsExclude = []uint16{15090, 15021, 15020}
	cfg.OutboundIPRangesAll = true
	b.ReportAllocs()
	for b.Loop() {
		plan, err := Build(&cfg)
		if err != nil {
			b.Fatal(err)
		}
		_ = plan.V4.RestoreInput()
	}
}

func BenchmarkParseConfigInjector(b *testing.B) {
	args := append(append([]string{}, injectorArgs...), "--redirect-dns", "--capture-all-dns")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := parseArgs(args, nil, fakeAddrs(true), ""); err != nil {
			b.Fatal(err)
		}
	}
}
