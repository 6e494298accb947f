package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/iptables"
)

// injector is the istio-init command line of an injected sidecar.
var injector = []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}

type iptablesRun struct {
	stdout   string
	err      error
	executed *iptables.Plan
}

// runIptablesCmd executes istio-iptables in-process with a v4 pod, the given
// env, and an execute that records the plan instead of touching the kernel.
func runIptablesCmd(t *testing.T, env map[string]string, execErr error, args ...string) iptablesRun {
	t.Helper()
	var res iptablesRun
	deps := iptablesDeps{
		lookupEnv: func(k string) (string, bool) { v, ok := env[k]; return v, ok },
		interfaceAddrs: func() ([]net.Addr, error) {
			return []net.Addr{&net.IPNet{IP: net.IPv4(10, 1, 2, 3).To4(), Mask: net.CIDRMask(24, 32)}}, nil
		},
		resolvConf: filepath.Join(t.TempDir(), "resolv.conf"),
		execute: func(_ context.Context, _ *iptables.Config, plan *iptables.Plan, _ *zap.Logger) error {
			res.executed = plan
			return execErr
		},
	}
	if err := os.WriteFile(deps.resolvConf, []byte("nameserver 10.96.0.10\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	g := &globalFlags{}
	g.log.OutputLevel = "none"
	cmd := newIptablesCmdWith(g, deps)
	cmd.SilenceErrors, cmd.SilenceUsage = true, true
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs(args)
	res.err = cmd.ExecuteContext(context.Background())
	res.stdout = out.String()
	return res
}

func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ec *exitCodeError
	if errors.As(err, &ec) {
		return ec.code
	}
	return 255
}

func TestIptablesDryRunPrintsRestoreInput(t *testing.T) {
	res := runIptablesCmd(t, nil, nil, append(injector, "-n")...)
	if res.err != nil {
		t.Fatal(res.err)
	}
	if res.executed != nil {
		t.Fatal("dry run called Execute")
	}
	for _, want := range []string{
		"# ipv4: iptables-restore --noflush\n* nat\n-N ISTIO_INBOUND\n",
		"-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN\n",
		"-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n",
	} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("dry run output lacks %q:\n%s", want, res.stdout)
		}
	}
	if strings.Contains(res.stdout, "ipv6") {
		t.Errorf("IPv6 rules for a v4 pod:\n%s", res.stdout)
	}
}

func TestIptablesDryRunFromEnv(t *testing.T) {
	file := filepath.Join(t.TempDir(), "dry-run.txt")
	res := runIptablesCmd(t, map[string]string{"DRY_RUN": "true", "ISTIO_META_DNS_CAPTURE": "true", "DRY_RUN_FILE_PATH": file}, nil, injector...)
	if res.err != nil || res.executed != nil {
		t.Fatalf("err %v, executed %v", res.err, res.executed != nil)
	}
	if !strings.Contains(res.stdout, "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053") {
		t.Errorf("DNS capture missing:\n%s", res.stdout)
	}
	got, err := os.ReadFile(file)
	if err != nil || string(got) != res.stdout {
		t.Errorf("DRY_RUN_FILE_PATH content differs from stdout (err %v)", err)
	}
}

func TestIptablesExecutes(t *testing.T) {
	res := runIptablesCmd(t, nil, nil, injector...)
	if res.err != nil {
		t.Fatal(res.err)
	}
	if res.executed == nil || res.executed.V4 == nil || res.stdout != "" {
		t.Fatalf("plan not executed (or printed: %q)", res.stdout)
	}
}

func TestIptablesExitCodes(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		env      map[string]string
		execErr  error
		code     int
		mentions []string
	}{
		{"validation failure", injector, nil, fmt.Errorf("validate: %w", iptables.ErrValidationFailed), 126, []string{"validation"}},
		{"apply failure", injector, nil, errors.New("iptables-restore: exit status 1"), 1, []string{"iptables-restore"}},
		{"port out of range", []string{"-p", "70000"}, nil, nil, 1, []string{"--envoy-port", "70000"}},
		{"non-numeric uid", []string{"-u", "istio-proxy"}, nil, nil, 1, []string{"--proxy-uid", "istio-proxy"}},
		{"interface with spaces", []string{"-c", "eth0 -j ACCEPT"}, nil, nil, 1, []string{"--istio-exclude-interfaces", "eth0 -j ACCEPT"}},
		{"malformed cidr", []string{"-i", "10.0.0.0/40"}, nil, nil, 1, []string{"--istio-service-cidr", "10.0.0.0/40"}},
		{"unknown mode", []string{"-m", "BPF"}, nil, nil, 1, []string{"--istio-inbound-interception-mode", "BPF"}},
		{"bad env", nil, map[string]string{"ISTIO_INBOUND_PORTS": "http"}, nil, 1, []string{"ISTIO_INBOUND_PORTS", "http"}},
		{"bad bool flag value", []string{"--dry-run=maybe"}, nil, nil, 1, []string{"dry-run"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := runIptablesCmd(t, tt.env, tt.execErr, tt.args...)
			if got := exitCode(res.err); got != tt.code {
				t.Fatalf("exit code %d, want %d (err %v)", got, tt.code, res.err)
			}
			if tt.code == 1 && tt.execErr == nil && res.executed != nil {
				t.Error("bad input reached Execute")
			}
			for _, m := range tt.mentions {
				if !strings.Contains(res.err.Error(), m) {
					t.Errorf("error %q does not mention %q", res.err, m)
				}
			}
		})
	}
}

// Through main's run: the command is registered and its codes reach the
// process exit code. --log_stacktrace_level=none: internal/logging rejects
// the root's default "default:none" (reported to the lead).
func TestIptablesRun(t *testing.T) {
	base := []string{"istio-iptables", "--log_stacktrace_level=none", "--log_output_level=default:none"}
	if code := run(append(base, "-p", "0")); code != 1 {
		t.Errorf("bad port: exit %d, want 1", code)
	}
	if code := run(append(base, "-c", "eth0 ; reboot")); code != 1 {
		t.Errorf("bad interface: exit %d, want 1", code)
	}
	stdout := os.Stdout
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	os.Stdout = w
	code := run(append(append(base, injector...), "--dry-run", "--native-nftables", "--some-future-flag=1"))
	os.Stdout = stdout
	w.Close()
	var out bytes.Buffer
	_, _ = out.ReadFrom(r)
	if code != 0 || !strings.Contains(out.String(), "-A OUTPUT -j ISTIO_OUTPUT") {
		t.Fatalf("dry run: exit %d, output:\n%s", code, out.String())
	}
}
