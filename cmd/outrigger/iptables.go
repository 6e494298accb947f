package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/iptables"
)

// iptablesDeps are the outside inputs of istio-iptables, replaced in tests.
type iptablesDeps struct {
	lookupEnv      func(string) (string, bool)
	interfaceAddrs func() ([]net.Addr, error)
	resolvConf     string
	execute        func(context.Context, *iptables.Config, *iptables.Plan, *zap.Logger) error
}

func newIptablesCmd(g *globalFlags) *cobra.Command {
	return newIptablesCmdWith(g, iptablesDeps{})
}

func newIptablesCmdWith(g *globalFlags, deps iptablesDeps) *cobra.Command {
	if deps.lookupEnv == nil {
		deps.lookupEnv = os.LookupEnv
	}
	if deps.execute == nil {
		deps.execute = iptables.Execute
	}
	cmd := &cobra.Command{
		Use:   "istio-iptables",
		Short: "Set up the pod's traffic capture (the istio-init container), a drop-in for Istio's istio-iptables",
		Long: `Set up the iptables rules that send the pod's traffic through the proxy: outbound to
15001, inbound to 15006, DNS to 15053 when asked. Accepts the flags and env vars of
Istio's "pilot-agent istio-iptables". Exits 1 on a bad flag (before changing anything)
or a failed apply, and 126 when --run-validation cannot prove the redirect works.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runIptables(cmd, g, deps, args)
		},
	}
	iptables.RegisterFlags(cmd.Flags())
	// Flag values that pflag itself rejects (a bool flag given "maybe")
	// are configuration errors too: exit 1 like Istio.
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return withExitCode(1, fmt.Errorf("istio-iptables: %w", err))
	})
	return cmd
}

func runIptables(cmd *cobra.Command, g *globalFlags, deps iptablesDeps, args []string) error {
	root, err := g.logger()
	if err != nil {
		return withExitCode(1, err)
	}
	defer func() { _ = root.Sync() }()
	log := root.Named("iptables")
	if len(args) > 0 {
		log.Warn("ignoring arguments that are not flags", zap.Strings("args", args))
	}

	cfg, err := iptables.ParseConfig(iptables.Inputs{
		Flags:          iptables.ChangedFlags(cmd.Flags()),
		LookupEnv:      deps.lookupEnv,
		InterfaceAddrs: deps.interfaceAddrs,
		ResolvConf:     deps.resolvConf,
	}, log)
	if err != nil {
		return withExitCode(1, err)
	}
	if v, ok := deps.lookupEnv(iptables.EnvDryRunFilePath); ok {
		cfg.DryRunFilePath = v
	}
	logConfig(log, cfg)

	plan, err := iptables.Build(cfg)
	if err != nil {
		return withExitCode(1, err)
	}
	if cfg.DryRun {
		return printDryRun(cmd, cfg, plan)
	}
	if err := deps.execute(cmd.Context(), cfg, plan, log); err != nil {
		if errors.Is(err, iptables.ErrValidationFailed) {
			return withExitCode(126, err)
		}
		return withExitCode(1, err)
	}
	return nil
}

// printDryRun writes the plan to stdout (and DRY_RUN_FILE_PATH) and changes
// nothing.
func printDryRun(cmd *cobra.Command, cfg *iptables.Config, plan *iptables.Plan) error {
	var b strings.Builder
	if cfg.CleanupOnly {
		b.WriteString("# dry run with --cleanup-only: the chains, rules and routes below are what cleanup removes\n")
	}
	b.WriteString(plan.Render())
	if _, err := fmt.Fprint(cmd.OutOrStdout(), b.String()); err != nil {
		return withExitCode(1, fmt.Errorf("istio-iptables: write dry run: %w", err))
	}
	if cfg.DryRunFilePath != "" {
		if err := os.WriteFile(cfg.DryRunFilePath, []byte(b.String()), 0o644); err != nil {
			return withExitCode(1, fmt.Errorf("istio-iptables: write dry run to %s (%s): %w", cfg.DryRunFilePath, iptables.EnvDryRunFilePath, err))
		}
	}
	return nil
}

// logConfig logs the effective configuration once, as Istio does, so a
// pod's init log shows what was captured.
func logConfig(log *zap.Logger, cfg *iptables.Config) {
	inbound := "none"
	switch {
	case cfg.InboundPortsAll:
		inbound = "*"
	case len(cfg.InboundPorts) > 0:
		inbound = fmt.Sprint(cfg.InboundPorts)
	}
	outbound := "none"
	switch {
	case cfg.OutboundIPRangesAll:
		outbound = "*"
	case len(cfg.OutboundIPRangesInclude) > 0:
		outbound = fmt.Sprint(cfg.OutboundIPRangesInclude)
	}
	log.Info("istio-iptables configuration",
		zap.String("mode", string(cfg.Mode)),
		zap.Uint16("proxy_port", cfg.ProxyPort),
		zap.Uint16("inbound_capture_port", cfg.InboundCapturePort),
		zap.String("inbound_ports", inbound),
		zap.Any("inbound_ports_exclude", cfg.InboundPortsExclude),
		zap.String("outbound_ranges", outbound),
		zap.Stringers("outbound_ranges_exclude", cfg.OutboundIPRangesExclude),
		zap.Any("outbound_ports_include", cfg.OutboundPortsInclude),
		zap.Any("outbound_ports_exclude", cfg.OutboundPortsExclude),
		zap.Strings("proxy_uids", cfg.ProxyUIDs),
		zap.Strings("proxy_gids", cfg.ProxyGIDs),
		zap.Strings("exclude_interfaces", cfg.ExcludeInterfaces),
		zap.Strings("kube_virt_interfaces", cfg.KubeVirtInterfaces),
		zap.Bool("ipv6", cfg.EnableIPv6),
		zap.Bool("redirect_dns", cfg.RedirectDNS),
		zap.Bool("capture_all_dns", cfg.CaptureAllDNS),
		zap.Stringers("dns_servers_v4", cfg.DNSServersV4),
		zap.Stringers("dns_servers_v6", cfg.DNSServersV6),
		zap.Bool("drop_invalid", cfg.DropInvalid),
		zap.Bool("dry_run", cfg.DryRun),
		zap.Bool("cleanup_only", cfg.CleanupOnly),
	)
}
