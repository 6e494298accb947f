package iptables

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// parse runs ParseConfig on a command line and env with a v4 pod and no
// ENVOY_USER.
func parse(t *testing.T, args []string, env map[string]string) (*Config, error) {
	t.Helper()
	return parseArgs(args, env, fakeAddrs(false), filepath.Join(t.TempDir(), "missing-resolv.conf"))
}

func TestParseDefaults(t *testing.T) {
	cfg, err := parse(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultConfig()
	want.HostIP = netip.MustParseAddr("10.244.0.5")
	if diff := cmp.Diff(&want, cfg, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Fatalf("defaults (-want +got):\n%s", diff)
	}
	if cfg.Mode != ModeRedirect || cfg.ProxyPort != 15001 || cfg.InboundCapturePort != 15006 || cfg.InboundTunnelPort != 15008 ||
		cfg.InboundTProxyMark != 1337 || cfg.InboundTProxyRouteTable != 133 || cfg.ProbePort != 15002 || cfg.ProbeTimeout != 5*time.Second ||
		cfg.HostIPv4LoopbackCIDR.String() != "127.0.0.1/32" || cfg.OwnerGroupsInclude != nil {
		t.Fatalf("defaults are not Istio's: %+v", cfg)
	}
}

func TestParsePrecedence(t *testing.T) {
	tests := []struct {
		name  string
		args  []string
		env   map[string]string
		check func(*Config) bool
	}{
		{"env used when no flag", nil, map[string]string{"INBOUND_CAPTURE_PORT": "16006"},
			func(c *Config) bool { return c.InboundCapturePort == 16006 }},
		{"flag beats env", []string{"-z", "17006"}, map[string]string{"INBOUND_CAPTURE_PORT": "16006"},
			func(c *Config) bool { return c.InboundCapturePort == 17006 }},
		{"long flag", []string{"--inbound-capture-port=18006"}, nil,
			func(c *Config) bool { return c.InboundCapturePort == 18006 }},
		{"envoy-port has no env", nil, map[string]string{"ENVOY_PORT": "9999"},
			func(c *Config) bool { return c.ProxyPort == 15001 }},
		{"ISTIO_META_DNS_CAPTURE turns on redirect-dns", nil, map[string]string{"ISTIO_META_DNS_CAPTURE": "true", "CAPTURE_ALL_DNS": "true"},
			func(c *Config) bool { return c.RedirectDNS }},
		// Istio sets the flag from REDIRECT_DNS, then again from
		// ISTIO_META_DNS_CAPTURE (pkg/flag AdditionalEnv): the alias wins,
		// which keeps the capture in step with proxy mode's DNS proxy
		// (started by ISTIO_META_DNS_CAPTURE).
		{"ISTIO_META_DNS_CAPTURE=true beats REDIRECT_DNS=false", nil, map[string]string{"REDIRECT_DNS": "false", "ISTIO_META_DNS_CAPTURE": "true", "CAPTURE_ALL_DNS": "true"},
			func(c *Config) bool { return c.RedirectDNS }},
		{"ISTIO_META_DNS_CAPTURE=false beats REDIRECT_DNS=true", nil, map[string]string{"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": "false", "CAPTURE_ALL_DNS": "true"},
			func(c *Config) bool { return !c.RedirectDNS }},
		{"REDIRECT_DNS alone", nil, map[string]string{"REDIRECT_DNS": "true", "CAPTURE_ALL_DNS": "true"},
			func(c *Config) bool { return c.RedirectDNS }},
		{"INVALID_DROP beats DROP_INVALID", nil, map[string]string{"DROP_INVALID": "true", "INVALID_DROP": "false"},
			func(c *Config) bool { return !c.DropInvalid }},
		{"ISTIO_DUAL_STACK beats DUAL_STACK", nil, map[string]string{"DUAL_STACK": "false", "ISTIO_DUAL_STACK": "true"},
			func(c *Config) bool { return c.DualStack }},
		{"--redirect-dns=false beats env", []string{"--redirect-dns=false"}, map[string]string{"ISTIO_META_DNS_CAPTURE": "true"},
			func(c *Config) bool { return !c.RedirectDNS }},
		{"INVALID_DROP alias", nil, map[string]string{"INVALID_DROP": "true"},
			func(c *Config) bool { return c.DropInvalid }},
		{"ISTIO_DUAL_STACK alias", nil, map[string]string{"ISTIO_DUAL_STACK": "1"},
			func(c *Config) bool { return c.DualStack }},
		{"empty env is unset", nil, map[string]string{"INBOUND_CAPTURE_PORT": ""},
			func(c *Config) bool { return c.InboundCapturePort == 15006 }},
		{"explicit empty -b beats env", []string{"-b", ""}, map[string]string{"ISTIO_INBOUND_PORTS": "*"},
			func(c *Config) bool { return !c.InboundPortsAll && len(c.InboundPorts) == 0 }},
		{"env wildcard", nil, map[string]string{"ISTIO_INBOUND_PORTS": "*", "ISTIO_SERVICE_CIDR": "*"},
			func(c *Config) bool { return c.InboundPortsAll && c.OutboundIPRangesAll }},
		{"gid defaults to uid", []string{"-u", "3,4"}, nil,
			func(c *Config) bool { return cmp.Equal(c.ProxyGIDs, []string{"3", "4"}) }},
		{"mode TPROXY", []string{"-m", "TPROXY"}, nil,
			func(c *Config) bool { return c.Mode == ModeTPROXY }},
		{"mode empty means REDIRECT", []string{"-m", ""}, nil,
			func(c *Config) bool { return c.Mode == ModeRedirect }},
		{"trailing comma", []string{"-b", "*", "-d", "6000,7000,"}, nil,
			func(c *Config) bool { return cmp.Equal(c.InboundPortsExclude, []uint16{6000, 7000}) }},
		{"owner groups", nil, map[string]string{EnvOwnerGroupsInclude: "java,202"},
			func(c *Config) bool { return cmp.Equal(c.OwnerGroupsInclude, []string{"java", "202"}) }},
		{"owner groups exclude ignored with include list", nil, map[string]string{EnvOwnerGroupsInclude: "java", EnvOwnerGroupsExclude: "ftp"},
			func(c *Config) bool { return c.OwnerGroupsExclude == nil }},
		{"loopback cidr /8", nil, map[string]string{EnvHostIPv4LoopbackCIDR: "127.0.0.1/8"},
			func(c *Config) bool { return c.HostIPv4LoopbackCIDR.String() == "127.0.0.1/8" }},
		{"probe timeout", []string{"--probe-timeout", "250ms"}, nil,
			func(c *Config) bool { return c.ProbeTimeout == 250*time.Millisecond }},
		{"force backend", nil, map[string]string{"FORCE_IPTABLES_BINARY": "legacy"},
			func(c *Config) bool { return c.ForceIptablesBinary == "legacy" }},
		{"interfaces", []string{"-c", "eth1,veth+", "-k", "kv0"}, nil,
			func(c *Config) bool {
				return cmp.Equal(c.ExcludeInterfaces, []string{"eth1", "veth+"}) && cmp.Equal(c.KubeVirtInterfaces, []string{"kv0"})
			}},
		{"mixed cidrs", []string{"-i", "10.0.0.0/8, fd00::/8", "-x", "10.1.0.0/16"}, nil,
			func(c *Config) bool {
				return len(c.OutboundIPRangesInclude) == 2 && c.OutboundIPRangesInclude[1].String() == "fd00::/8" && len(c.OutboundIPRangesExclude) == 1
			}},
		{"bool flags", []string{"-n", "--skip-rule-apply", "--run-validation", "--capture-all-dns", "--cni-mode", "--reconcile", "--cleanup-only", "--force-apply", "--native-nftables", "--network-namespace", "/var/run/netns/pod"}, nil,
			func(c *Config) bool {
				return c.DryRun && c.SkipRuleApply && c.RunValidation && c.CaptureAllDNS && c.CNIMode && c.Reconcile && c.CleanupOnly &&
					c.ForceApply && c.NativeNftables && c.NetworkNamespace == "/var/run/netns/pod"
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := parse(t, tt.args, tt.env)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(cfg) {
				t.Fatalf("unexpected config for %q %v: %+v", tt.args, tt.env, cfg)
			}
		})
	}
}

func TestParseEnvoyUser(t *testing.T) {
	lookup := func(name string) (string, error) {
		if name == "envoy" {
			return "101", nil
		}
		return "", errors.New("unknown user")
	}
	for _, tt := range []struct {
		env  map[string]string
		args []string
		want []string
	}{
		{map[string]string{EnvEnvoyUser: "envoy"}, nil, []string{"101"}},
		{map[string]string{EnvEnvoyUser: "nobody-here"}, nil, []string{"1337"}},
		{nil, nil, []string{"1337"}},
		{map[string]string{EnvEnvoyUser: "envoy"}, []string{"-u", "5"}, []string{"5"}},
	} {
		cfg, err := ParseConfig(Inputs{
			Flags:          flagsOf(t, tt.args),
			LookupEnv:      func(k string) (string, bool) { v, ok := tt.env[k]; return v, ok },
			InterfaceAddrs: fakeAddrs(false),
			LookupUserUID:  lookup,
		}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !cmp.Equal(cfg.ProxyUIDs, tt.want) || !cmp.Equal(cfg.ProxyGIDs, tt.want) {
			t.Errorf("env %v args %v: uids %v gids %v, want %v", tt.env, tt.args, cfg.ProxyUIDs, cfg.ProxyGIDs, tt.want)
		}
	}
}

func flagsOf(t *testing.T, args []string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for i := 0; i+1 < len(args); i += 2 {
		name := strings.TrimLeft(args[i], "-")
		if name == "u" {
			name = FlagProxyUID
		}
		m[name] = args[i+1]
	}
	return m
}

// Every bad value fails before anything is built, naming the flag or env
// var and the value.
func TestParseErrors(t *testing.T) {
	tests := []struct {
		args []string
		env  map[string]string
		want []string // substrings of the error
	}{
		{[]string{"-p", "70000"}, nil, []string{"-p/--envoy-port", `"70000"`, "out of range"}},
		{[]string{"-z", "abc"}, nil, []string{"-z/--inbound-capture-port", `"abc"`, "not a number"}},
		{[]string{"-e", "0"}, nil, []string{"-e/--inbound-tunnel-port", "out of range"}},
		{nil, map[string]string{"INBOUND_CAPTURE_PORT": "-1"}, []string{"env INBOUND_CAPTURE_PORT", `"-1"`}},
		{[]string{"-b", "80,http"}, nil, []string{"-b/--istio-inbound-ports", `"80,http"`, `"http"`}},
		{[]string{"-d", "99999"}, nil, []string{"-d/--istio-local-exclude-ports"}},
		{[]string{"-q", "1-2"}, nil, []string{"-q/--istio-outbound-ports"}},
		{[]string{"-o", "x"}, nil, []string{"-o/--istio-local-outbound-ports-exclude"}},
		{[]string{"--iptables-probe-port", "65536"}, nil, []string{"--iptables-probe-port", "out of range"}},
		{[]string{"-i", "10.0.0.0/33"}, nil, []string{"-i/--istio-service-cidr", "not a CIDR"}},
		{[]string{"-i", "10.0.0.1"}, nil, []string{"-i/--istio-service-cidr", "write 10.0.0.1/32"}},
		{[]string{"-x", "*"}, nil, []string{"-x/--istio-service-exclude-cidr", `"*"`}},
		{[]string{"-x", "bogus"}, nil, []string{"-x/--istio-service-exclude-cidr", "bogus"}},
		{[]string{"-m", "tproxy"}, nil, []string{"-m/--istio-inbound-interception-mode", `"tproxy"`, "REDIRECT or TPROXY"}},
		{nil, map[string]string{"ISTIO_INBOUND_INTERCEPTION_MODE": "NONE"}, []string{"env ISTIO_INBOUND_INTERCEPTION_MODE", "NONE"}},
		{[]string{"-u", "istio-proxy"}, nil, []string{"-u/--proxy-uid", "not a number"}},
		{[]string{"-g", "1,x"}, nil, []string{"-g/--proxy-gid", `"x"`}},
		{[]string{"-c", "eth0 -j ACCEPT"}, nil, []string{"-c/--istio-exclude-interfaces", "whitespace"}},
		{[]string{"-c", "-j"}, nil, []string{"-c/--istio-exclude-interfaces", "iptables option"}},
		{[]string{"-k", "!eth0"}, nil, []string{"-k/--kube-virt-interfaces", "iptables option"}},
		{[]string{"-k", "averyveryverylongname"}, nil, []string{"-k/--kube-virt-interfaces", "longer than 15"}},
		{[]string{"-c", "eth0/1"}, nil, []string{"-c/--istio-exclude-interfaces", `'/'`}},
		{[]string{"-c", "eth0:1"}, nil, []string{"-c/--istio-exclude-interfaces", `':'`}},
		{[]string{"-c", "a\"b"}, nil, []string{"-c/--istio-exclude-interfaces"}},
		{[]string{"-t", "mark"}, nil, []string{"-t/--istio-inbound-tproxy-mark", "not a fwmark"}},
		{[]string{"-r", "x"}, nil, []string{"-r/--istio-inbound-tproxy-route-table", "not a routing table"}},
		{[]string{"-r", "254"}, nil, []string{"-r/--istio-inbound-tproxy-route-table", "main"}},
		{[]string{"--probe-timeout", "5"}, nil, []string{"--probe-timeout", "duration"}},
		{[]string{"--force-iptables-binary", "nftables"}, nil, []string{"--force-iptables-binary", "legacy"}},
		{nil, map[string]string{"DROP_INVALID": "yes"}, []string{"env DROP_INVALID", "boolean"}},
		{nil, map[string]string{EnvHostIPv4LoopbackCIDR: "10.0.0.0/8"}, []string{EnvHostIPv4LoopbackCIDR, "loopback"}},
		{nil, map[string]string{EnvHostIPv4LoopbackCIDR: "127.0.0.0/7"}, []string{EnvHostIPv4LoopbackCIDR}},
		{nil, map[string]string{EnvHostIPv4LoopbackCIDR: "::1/128"}, []string{EnvHostIPv4LoopbackCIDR}},
		{nil, map[string]string{EnvOwnerGroupsInclude: manyGroups(65)}, []string{EnvOwnerGroupsInclude, "at most 64"}},
		{nil, map[string]string{EnvOwnerGroupsInclude: "java,-j"}, []string{EnvOwnerGroupsInclude, "iptables option"}},
		{nil, map[string]string{EnvOwnerGroupsExclude: "a b"}, []string{EnvOwnerGroupsExclude}},
	}
	for _, tt := range tests {
		_, err := parse(t, tt.args, tt.env)
		if err == nil {
			t.Errorf("%q %v: no error", tt.args, tt.env)
			continue
		}
		for _, w := range tt.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%q %v: error %q does not mention %q", tt.args, tt.env, err, w)
			}
		}
	}
}

func TestParseReportsEveryError(t *testing.T) {
	_, err := parse(t, []string{"-p", "0", "-z", "x", "-m", "FOO"}, nil)
	if err == nil {
		t.Fatal("no error")
	}
	for _, w := range []string{"--envoy-port", "--inbound-capture-port", "--istio-inbound-interception-mode"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %s", err, w)
		}
	}
}

func manyGroups(n int) string {
	g := make([]string, n)
	for i := range g {
		g[i] = "g" + strings.Repeat("x", i%3)
	}
	return strings.Join(g, ",")
}

func TestDeriveIPv6(t *testing.T) {
	ipnet := func(s string) net.Addr {
		p := netip.MustParsePrefix(s)
		return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	}
	tests := []struct {
		name      string
		addrs     []net.Addr
		dualStack bool
		wantV6    bool
		wantHost  string
	}{
		{"v4 pod", []net.Addr{ipnet("127.0.0.1/8"), ipnet("10.0.0.5/24")}, false, false, "10.0.0.5"},
		{"v6 pod", []net.Addr{ipnet("::1/128"), ipnet("fe80::1/64"), ipnet("fd00::5/64")}, false, true, "fd00::5"},
		{"v4 first, not dual stack", []net.Addr{ipnet("10.0.0.5/24"), ipnet("fd00::5/64")}, false, false, "10.0.0.5"},
		{"v4 first, dual stack", []net.Addr{ipnet("10.0.0.5/24"), ipnet("fd00::5/64")}, true, true, "10.0.0.5"},
		{"dual stack, v4 only", []net.Addr{ipnet("10.0.0.5/24"), ipnet("10.0.1.5/24")}, true, false, "10.0.0.5"},
		{"link-local v6 is ignored", []net.Addr{ipnet("fe80::1/64"), ipnet("10.0.0.5/24")}, false, false, "10.0.0.5"},
		{"v4-mapped counts as v4", []net.Addr{&net.IPNet{IP: net.ParseIP("::ffff:10.0.0.5"), Mask: net.CIDRMask(120, 128)}}, false, false, "10.0.0.5"},
		{"loopback only", []net.Addr{ipnet("127.0.0.1/8"), ipnet("::1/128")}, false, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.DualStack = tt.dualStack
			if err := deriveIPv6(&cfg, func() ([]net.Addr, error) { return tt.addrs, nil }, zap.NewNop()); err != nil {
				t.Fatal(err)
			}
			host := ""
			if cfg.HostIP.IsValid() {
				host = cfg.HostIP.String()
			}
			if cfg.EnableIPv6 != tt.wantV6 || host != tt.wantHost {
				t.Fatalf("EnableIPv6=%v HostIP=%q, want %v %q", cfg.EnableIPv6, host, tt.wantV6, tt.wantHost)
			}
		})
	}
}

func TestParseDNSServers(t *testing.T) {
	dir := t.TempDir()
	resolv := filepath.Join(dir, "resolv.conf")
	if err := os.WriteFile(resolv, []byte("search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\noptions ndots:5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty.conf")
	if err := os.WriteFile(empty, []byte("# nothing\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.conf")

	t.Run("servers split per family", func(t *testing.T) {
		cfg, err := parseArgs([]string{"--redirect-dns"}, nil, fakeAddrs(true), resolv)
		if err != nil {
			t.Fatal(err)
		}
		if got := addrs(cfg.DNSServersV4); got != "10.96.0.10" {
			t.Errorf("v4 servers %q", got)
		}
		if got := addrs(cfg.DNSServersV6); got != "fd00::a" {
			t.Errorf("v6 servers %q", got)
		}
	})
	t.Run("not read without redirect-dns", func(t *testing.T) {
		cfg, err := parseArgs(nil, nil, fakeAddrs(false), missing)
		if err != nil || len(cfg.DNSServersV4) != 0 {
			t.Fatalf("cfg %+v err %v", cfg, err)
		}
	})
	t.Run("not read with capture-all", func(t *testing.T) {
		cfg, err := parseArgs([]string{"--redirect-dns", "--capture-all-dns"}, nil, fakeAddrs(false), missing)
		if err != nil || len(cfg.DNSServersV4) != 0 {
			t.Fatalf("cfg %+v err %v", cfg, err)
		}
	})
	t.Run("missing resolv.conf is an error naming it", func(t *testing.T) {
		_, err := parseArgs([]string{"--redirect-dns"}, nil, fakeAddrs(false), missing)
		if err == nil || !strings.Contains(err.Error(), missing) || !strings.Contains(err.Error(), "--redirect-dns") {
			t.Fatalf("err %v", err)
		}
	})
	t.Run("no servers disables DNS capture with a warning", func(t *testing.T) {
		core, logs := observer.New(zapcore.WarnLevel)
		fs := flagsOf(t, nil)
		fs[FlagRedirectDNS] = "true"
		cfg, err := ParseConfig(Inputs{Flags: fs, LookupEnv: func(string) (string, bool) { return "", false },
			InterfaceAddrs: fakeAddrs(false), ResolvConf: empty}, zap.New(core))
		if err != nil {
			t.Fatal(err)
		}
		if logs.FilterMessageSnippet("DNS capture is disabled").Len() != 1 {
			t.Errorf("no warning logged: %v", logs.All())
		}
		plan, err := Build(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if in := plan.V4.RestoreInput(); strings.Contains(in, ChainOutputDNS) || strings.Contains(in, "53") {
			t.Errorf("DNS rules built without servers:\n%s", in)
		}
	})
}

func addrs(a []netip.Addr) string {
	s := make([]string, len(a))
	for i, x := range a {
		s[i] = x.String()
	}
	return strings.Join(s, ",")
}

func TestParseNameservers(t *testing.T) {
	in := `# generated
nameserver 10.96.0.10
nameserver   10.96.0.10
;nameserver 1.1.1.1
#nameserver 8.8.8.8
nameserver fe80::1%eth0
nameserver ::ffff:192.0.2.1
nameserver not-an-ip
nameserver 2001:db8::53 # trailing comment
search default.svc.cluster.local
`
	core, logs := observer.New(zapcore.WarnLevel)
	got := addrs(parseNameservers([]byte(in), "resolv.conf", zap.New(core)))
	want := "10.96.0.10,fe80::1,192.0.2.1,2001:db8::53"
	if got != want {
		t.Errorf("nameservers %q, want %q", got, want)
	}
	if logs.Len() != 1 {
		t.Errorf("want one warning for not-an-ip, got %v", logs.All())
	}
}

func FuzzParseNameservers(f *testing.F) {
	f.Add([]byte("nameserver 10.0.0.1\nnameserver fd00::1\n"))
	f.Add([]byte("nameserver fe80::1%eth0\n#x\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, a := range parseNameservers(data, "fuzz", nil) {
			if !a.IsValid() || a.Zone() != "" || a.Is4In6() {
				t.Fatalf("bad address %v", a)
			}
		}
	})
}

// An interface name that passes validation renders as exactly one argument
// of its rule: no iptables-argument injection.
func FuzzInterfaceName(f *testing.F) {
	for _, s := range []string{"eth0", "veth+", "eth0 -j ACCEPT", "-j", "a\tb", "a\nb", "ä", "a#b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if name == "" || strings.Contains(name, ",") {
			return
		}
		cfg, err := parse(t, []string{"-c", name}, nil)
		if err != nil {
			return
		}
		plan, err := Build(cfg)
		if err != nil {
			t.Fatal(err)
		}
		want := "-A PREROUTING -i " + name + " -j RETURN"
		for _, line := range strings.Split(plan.V4.RestoreInput(), "\n") {
			if strings.HasPrefix(line, "-A PREROUTING -i ") {
				if line != want || len(strings.Fields(line)) != 6 {
					t.Fatalf("interface %q renders as %q", name, line)
				}
				return
			}
		}
		t.Fatalf("no exclude rule for %q", name)
	})
}
