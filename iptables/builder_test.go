package iptables

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/spf13/pflag"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the builder's output")

// goldenCase is one configuration given as the istio-iptables command line,
// env and derived inputs, as in the reference harness.
type goldenCase struct {
	name string
	// args after "istio-iptables"; base flags of the harness are added.
	args []string
	env  map[string]string
	ipv6 bool
	// dns are the resolv.conf nameservers.
	dns []string
	// upstreamLines is the line count of Istio's golden for this case (its
	// test table), checked against ours: 2 save lines + restore inputs +
	// 1 or 2 save lines.
	upstreamLines int
}

// harnessBase is the reference harness's base config (constructTestConfig):
// no inbound or outbound capture unless the case asks.
var harnessBase = []string{"-p", "15001", "-z", "15006", "-e", "15008", "-t", "1337", "-r", "133", "-u", "1337", "-g", "1337", "-m", "REDIRECT", "-b", "", "-i", ""}

// goldenCases covers Istio's 27 upstream cases, the two generated injector
// cases and a few of our own.
var goldenCases = []goldenCase{
	{name: "empty", upstreamLines: 21},
	{name: "ipv6-empty-inbound-ports", ipv6: true, upstreamLines: 40},
	{name: "ip-range", args: []string{"-u", "3,4", "-g", "1,2", "-i", "9.9.0.0/16", "-x", "1.1.0.0/16", "--redirect-dns", "-n"}, dns: []string{"127.0.0.53"}, upstreamLines: 49},
	{name: "tproxy", args: []string{"-m", "TPROXY", "-b", "*", "-i", "9.9.0.0/16", "-x", "1.1.0.0/16", "-c", "not-istio-nic", "--redirect-dns", "-n"}, ipv6: true, dns: []string{"127.0.0.53"}, upstreamLines: 112},
	{name: "ipv6-inbound-ports", args: []string{"-b", "4000,5000"}, ipv6: true, upstreamLines: 46},
	{name: "ipv6-virt-interfaces", args: []string{"-b", "4000,5000", "-k", "eth0,eth1"}, ipv6: true, upstreamLines: 50},
	{name: "ipv6-ipnets", args: []string{"-b", "4000,5000", "-d", "6000,7000,", "-k", "eth0,eth1", "-x", "2001:db8::/32", "-i", "2001:db8::/32"}, ipv6: true, upstreamLines: 54},
	{name: "ipv6-uid-gid", args: []string{"-b", "4000,5000", "-d", "6000,7000", "-k", "eth0,eth1", "-u", "3,4", "-g", "1,2", "-x", "2001:db8::/32", "-i", "2001:db8::/32"}, ipv6: true, upstreamLines: 66},
	{name: "ipv6-outbound-ports", args: []string{"-q", "32000,31000"}, ipv6: true, upstreamLines: 44},
	{name: "kube-virt-interfaces", args: []string{"-k", "eth1,eth2", "-i", "*"}, upstreamLines: 26},
	{name: "ipnets", args: []string{"-i", "10.0.0.0/8"}, upstreamLines: 22},
	{name: "ipnets-with-kube-virt-interfaces", args: []string{"-k", "eth1,eth2", "-i", "10.0.0.0/8"}, upstreamLines: 26},
	{name: "inbound-ports-include", args: []string{"-b", "32000,31000"}, upstreamLines: 24},
	{name: "inbound-ports-wildcard", args: []string{"-b", "*"}, upstreamLines: 23},
	{name: "inbound-ports-tproxy", args: []string{"-m", "TPROXY", "-b", "32000,31000"}, upstreamLines: 42},
	{name: "inbound-ports-wildcard-tproxy", args: []string{"-m", "TPROXY", "-b", "*"}, upstreamLines: 40},
	{name: "dns-uid-gid", args: []string{"-u", "3,4", "-g", "1,2", "--redirect-dns"}, ipv6: true, dns: []string{"127.0.0.53", "::127.0.0.53"}, upstreamLines: 92},
	{name: "ipv6-dns-uid-gid", args: []string{"-u", "3,4", "-g", "1,2", "--redirect-dns"}, ipv6: true, upstreamLines: 52},
	{name: "outbound-owner-groups", env: map[string]string{EnvOwnerGroupsInclude: "java,202"}, upstreamLines: 22},
	{name: "outbound-owner-groups-exclude", env: map[string]string{EnvOwnerGroupsExclude: "888,ftp"}, upstreamLines: 23},
	{name: "ipv6-dns-outbound-owner-groups", args: []string{"--redirect-dns"}, env: map[string]string{EnvOwnerGroupsInclude: "java,202"}, ipv6: true, upstreamLines: 42},
	{name: "ipv6-dns-outbound-owner-groups-exclude", args: []string{"--redirect-dns"}, env: map[string]string{EnvOwnerGroupsExclude: "888,ftp"}, ipv6: true, upstreamLines: 44},
	{name: "outbound-ports-include", args: []string{"-q", "32000,31000"}, upstreamLines: 23},
	{name: "loopback-outbound-iprange", args: []string{"-i", "127.1.2.3/32", "--redirect-dns", "-n", "-u", "3,4", "-g", "1,2"}, dns: []string{"127.0.0.53"}, upstreamLines: 44},
	{name: "basic-exclude-nic", args: []string{"-c", "not-istio-nic"}, upstreamLines: 23},
	{name: "drop-invalid", args: []string{"--drop-invalid"}, upstreamLines: 26},
	{name: "host-ipv4-loopback-cidr", env: map[string]string{EnvHostIPv4LoopbackCIDR: "127.0.0.1/8"}, upstreamLines: 21},

	// The sidecar injector's flags (generated reference cases).
	{name: "default-injection", args: injectorArgs},
	{name: "default-injection-dns", args: injectorArgs, env: map[string]string{"ISTIO_META_DNS_CAPTURE": "true"}, dns: []string{"10.96.0.10"}},

	// Our own.
	{name: "default-injection-ipv6-dns", args: injectorArgs, env: map[string]string{"ISTIO_META_DNS_CAPTURE": "true"}, ipv6: true, dns: []string{"10.96.0.10", "fd00:10:96::a"}},
	{name: "default-injection-tproxy-ipv6", args: append(append([]string{}, injectorArgs...), "-m", "TPROXY"), ipv6: true},
	{name: "capture-all-dns-ipv6", args: append(append([]string{}, injectorArgs...), "--redirect-dns", "--capture-all-dns"), ipv6: true},
	{name: "dns-ipv6-servers-only", args: append(append([]string{}, injectorArgs...), "--redirect-dns"), ipv6: true, dns: []string{"fd00::53"}},
	{name: "outbound-ports-exclude-and-mixed-cidrs", args: []string{"-b", "*", "-o", "3306,6379", "-i", "10.0.0.0/8,fd00::/8", "-x", "10.1.0.0/16,fd00:1::/64", "-k", "vk0"}, ipv6: true},
	{name: "drop-invalid-tproxy-exclude-nic", args: []string{"-m", "TPROXY", "-b", "8080", "-c", "eth9", "--drop-invalid", "-t", "7", "-r", "70"}},
}

var injectorArgs = []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}

// configFor parses a case through the same path as the command: flags,
// env, interface addresses and resolv.conf.
func configFor(t *testing.T, c goldenCase) *Config {
	t.Helper()
	args := append(append([]string{}, harnessBase...), c.args...)
	resolv := filepath.Join(t.TempDir(), "resolv.conf")
	var rc strings.Builder
	for _, s := range c.dns {
		rc.WriteString("nameserver " + s + "\n")
	}
	if err := os.WriteFile(resolv, []byte(rc.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseArgs(args, c.env, fakeAddrs(c.ipv6), resolv)
	if err != nil {
		t.Fatalf("parse %q: %v", args, err)
	}
	return cfg
}

func parseArgs(args []string, env map[string]string, addrs func() ([]net.Addr, error), resolv string) (*Config, error) {
	fs := pflag.NewFlagSet("istio-iptables", pflag.ContinueOnError)
	RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	return ParseConfig(Inputs{
		Flags:          ChangedFlags(fs),
		LookupEnv:      func(k string) (string, bool) { v, ok := env[k]; return v, ok },
		InterfaceAddrs: addrs,
		LookupUserUID:  func(string) (string, error) { return "", errors.New("no such user") },
		ResolvConf:     resolv,
	}, nil)
}

func fakeAddrs(ipv6 bool) func() ([]net.Addr, error) {
	pod := &net.IPNet{IP: net.ParseIP("10.244.0.5").To4(), Mask: net.CIDRMask(24, 32)}
	if ipv6 {
		pod = &net.IPNet{IP: net.ParseIP("fd00:10:244::5"), Mask: net.CIDRMask(64, 128)}
	}
	return func() ([]net.Addr, error) {
		return []net.Addr{
			&net.IPNet{IP: net.IPv4(127, 0, 0, 1).To4(), Mask: net.CIDRMask(8, 32)},
			&net.IPNet{IP: net.ParseIP("fe80::1"), Mask: net.CIDRMask(64, 128)},
			pod,
		}, nil
	}
}

func TestBuildGolden(t *testing.T) {
	for _, c := range goldenCases {
		t.Run(c.name, func(t *testing.T) {
			plan, err := Build(configFor(t, c))
			if err != nil {
				t.Fatal(err)
			}
			got := plan.Render()
			path := filepath.Join("testdata", c.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -run TestBuildGolden -update to create it)", err)
			}
			if diff := cmp.Diff(string(want), got); diff != "" {
				t.Errorf("restore input differs from %s (-want +got):\n%s", path, diff)
			}
			if c.upstreamLines > 0 {
				lines := 2 + 1
				for _, rs := range plan.Rulesets() {
					lines += strings.Count(rs.RestoreInput(), "\n")
				}
				if plan.V6 != nil {
					lines++
				}
				if lines != c.upstreamLines {
					t.Errorf("the upstream golden has %d lines, ours would have %d", c.upstreamLines, lines)
				}
			}
		})
	}
}

// TestBuildMatchesReference compares our restore input, per family, with
// the reference output of Istio for the same flags.
func TestBuildMatchesReference(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "reference", "*.golden"))
	if err != nil || len(files) != 8 {
		t.Fatalf("want the 8 reference goldens in testdata/reference, got %d (%v)", len(files), err)
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".golden")
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			ref := parseReference(t, string(data))
			plan, err := Build(configFor(t, ref.goldenCase))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(ref.v4, canonicalAddrs(plan.V4.RestoreInput())); diff != "" {
				t.Errorf("IPv4 restore input differs from the reference (-reference +ours):\n%s", diff)
			}
			var v6 string
			if plan.V6 != nil {
				v6 = canonicalAddrs(plan.V6.RestoreInput())
			}
			if diff := cmp.Diff(ref.v6, v6); diff != "" {
				t.Errorf("IPv6 restore input differs from the reference (-reference +ours):\n%s", diff)
			}
		})
	}
}

type reference struct {
	goldenCase
	v4, v6 string
}

var (
	headerFlags = regexp.MustCompile(`\| flags: istio-iptables (.*?) \| env: (.*?) \| derived\(non-flag\): (.*)$`)
	headerIPv6  = regexp.MustCompile(`ENABLE_INBOUND_IPV6=(true|false)`)
	headerDNS   = regexp.MustCompile(`v4=\[(.*?)\] v6=\[(.*?)\]`)
)

// parseReference reads a reference golden: the header line gives the flags,
// env and derived inputs; the body is "iptables-save", "ip6tables-save",
// the v4 restore input, the v6 one when IPv6 is on, and the final saves.
func parseReference(t *testing.T, data string) reference {
	t.Helper()
	header, body, _ := strings.Cut(data, "\n")
	m := headerFlags.FindStringSubmatch(header)
	if m == nil {
		t.Fatalf("unexpected header: %s", header)
	}
	var ref reference
	// "(i.e. ISTIO_META_DNS_CAPTURE=true)" explains --redirect-dns.
	flags := regexp.MustCompile(`\(i\.e\. [^)]*\)`).ReplaceAllString(m[1], "")
	ref.args = shellWords(t, flags)
	ref.env = map[string]string{}
	for _, kv := range shellWords(t, m[2]) {
		k, v, _ := strings.Cut(kv, "=")
		ref.env[k] = v
	}
	ref.ipv6 = headerIPv6.FindStringSubmatch(m[3])[1] == "true"
	dns := headerDNS.FindStringSubmatch(m[3])
	for _, l := range dns[1:] {
		for _, s := range strings.Split(l, ",") {
			if s = strings.TrimSpace(s); s != "" {
				ref.dns = append(ref.dns, s)
			}
		}
	}

	body = strings.TrimPrefix(body, "iptables-save\nip6tables-save\n")
	body = strings.TrimSuffix(body, "ip6tables-save\n")
	body = strings.TrimSuffix(body, "iptables-save\n")
	// Tables are sorted within a family: a table name not after the previous
	// one starts the IPv6 input.
	var v4, v6 strings.Builder
	cur, last := &v4, ""
	for _, line := range strings.SplitAfter(body, "\n") {
		if table, ok := strings.CutPrefix(line, "* "); ok {
			table = strings.TrimSpace(table)
			if table <= last {
				cur = &v6
			}
			last = table
		}
		cur.WriteString(line)
	}
	ref.v4, ref.v6 = canonicalAddrs(v4.String()), canonicalAddrs(v6.String())
	if ref.ipv6 != (ref.v6 != "") {
		t.Fatalf("header says IPv6=%v but the body has IPv6 input %q", ref.ipv6, ref.v6)
	}
	return ref
}

// shellWords splits a header's command line: words separated by spaces,
// '...' quoting (so ” is an empty argument).
func shellWords(t *testing.T, s string) []string {
	t.Helper()
	var words []string
	var w strings.Builder
	inWord, quoted := false, false
	for _, r := range s {
		switch {
		case r == '\'':
			quoted = !quoted
			inWord = true
		case r == ' ' && !quoted:
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if quoted {
		t.Fatalf("unbalanced quote in %q", s)
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}

// canonicalAddrs rewrites every address in restore input to Go's canonical
// text. Normalisation, not a behaviour difference: Istio copies resolv.conf
// text verbatim (-d ::127.0.0.53/128), we render parsed addresses
// (-d ::7f00:35/128); ip6tables stores the same 128 bits for both (see
// TestCanonicalAddrsSameAddress).
func canonicalAddrs(s string) string {
	words := strings.Split(s, " ")
	for i, w := range words {
		if !strings.Contains(w, "/") || !strings.Contains(w, ":") {
			continue
		}
		if p, err := netip.ParsePrefix(strings.TrimSuffix(w, "\n")); err == nil {
			words[i] = p.String() + w[len(strings.TrimSuffix(w, "\n")):]
		}
	}
	return strings.Join(words, " ")
}

func TestCanonicalAddrsSameAddress(t *testing.T) {
	istio := netip.MustParsePrefix("::127.0.0.53/128")
	ours := netip.MustParsePrefix("::7f00:35/128")
	if istio != ours {
		t.Fatalf("%v and %v are different prefixes", istio, ours)
	}
	got := canonicalAddrs("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d ::127.0.0.53/128 -j CT --zone 2\n")
	want := "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d ::7f00:35/128 -j CT --zone 2\n"
	if got != want {
		t.Fatalf("canonicalAddrs = %q, want %q", got, want)
	}
}

func TestShellWords(t *testing.T) {
	got := shellWords(t, `-b '*' -x '' -d 1,2 -i ''`)
	want := []string{"-b", "*", "-x", "", "-d", "1,2", "-i", ""}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatal(diff)
	}
}

func ExamplePlan_Render() {
	cfg := DefaultConfig()
	cfg.InboundPortsAll = true
	cfg.InboundPortsExclude = []uint16{15090, 15021, 15020}
	cfg.OutboundIPRangesAll = true
	plan, _ := Build(&cfg)
	fmt.Print(plan.Render())
	// Output:
	// # ipv4: iptables-restore --noflush
	// * nat
	// -N ISTIO_INBOUND
	// -N ISTIO_REDIRECT
	// -N ISTIO_IN_REDIRECT
	// -N ISTIO_OUTPUT
	// -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
	// -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
	// -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
	// -A PREROUTING -p tcp -j ISTIO_INBOUND
	// -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
	// -A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
	// -A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
	// -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
	// -A OUTPUT -j ISTIO_OUTPUT
	// -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
	// -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
	// -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
	// -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
	// -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
	// -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
	// -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
	// -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
	// -A ISTIO_OUTPUT -j ISTIO_REDIRECT
	// COMMIT
}
