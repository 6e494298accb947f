package iptables

import (
	"os"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// Every flag, shorthand and env var of the table is documented.
func TestFlagsDocumented(t *testing.T) {
	doc, err := os.ReadFile("../docs/iptables.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range FlagSpecs() {
		if s.Name != "" && !strings.Contains(string(doc), "`--"+s.Name+"`") {
			t.Errorf("docs/iptables.md lacks --%s", s.Name)
		}
		if s.Shorthand != "" && !strings.Contains(string(doc), "`-"+s.Shorthand+"`") {
			t.Errorf("docs/iptables.md lacks -%s", s.Shorthand)
		}
		for _, e := range s.Env {
			if !strings.Contains(string(doc), "`"+e+"`") {
				t.Errorf("docs/iptables.md lacks %s", e)
			}
		}
	}
}

func TestRegisterFlagsShorthands(t *testing.T) {
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	RegisterFlags(fs)
	want := map[string]string{"p": FlagEnvoyPort, "z": FlagInboundCapturePort, "e": FlagInboundTunnelPort, "u": FlagProxyUID,
		"g": FlagProxyGID, "m": FlagInterceptionMode, "b": FlagInboundPorts, "d": FlagLocalExcludePorts, "c": FlagExcludeInterfaces,
		"i": FlagServiceCIDR, "x": FlagServiceExcludeCIDR, "q": FlagOutboundPorts, "o": FlagLocalOutboundPortsExcl,
		"k": FlagKubeVirtInterfaces, "t": FlagTProxyMark, "r": FlagTProxyRouteTable, "n": FlagDryRun}
	for short, long := range want {
		f := fs.ShorthandLookup(short)
		if f == nil || f.Name != long {
			t.Errorf("-%s is %v, want --%s", short, f, long)
		}
	}
	if err := fs.Parse([]string{"-n", "-b", "*", "--log_output_level=x"}); err == nil {
		t.Fatal("unknown flag accepted by the bare flag set")
	}
	_ = fs.Parse([]string{"-n", "-b", "*"})
	got := ChangedFlags(fs)
	if len(got) != 2 || got[FlagDryRun] != "true" || got[FlagInboundPorts] != "*" {
		t.Fatalf("ChangedFlags = %v", got)
	}
}
