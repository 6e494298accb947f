package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/outrigger-mesh/outrigger/agent/bootstrap"
	"github.com/outrigger-mesh/outrigger/agent/config"
	"github.com/outrigger-mesh/outrigger/agent/envoy"
)

// proxyFlags are Istio's `pilot-agent proxy` flags, accepted unchanged so
// injected pod specs keep working.
type proxyFlags struct {
	domain                 string
	meshConfig             string
	stsPort                uint16
	tokenManagerPlugin     string
	serviceCluster         string
	proxyLogLevel          string
	proxyComponentLogLevel string
	concurrency            int
	templateFile           string
	outlierLogPath         string
	profiling              bool
}

func newProxyCmd(g *globalFlags) *cobra.Command {
	f := &proxyFlags{}
	cmd := &cobra.Command{
		Use:   "proxy [sidecar|router]",
		Short: "Run the mesh agent: generate Envoy's bootstrap, supervise Envoy and drain it on shutdown",
		Long: "Runs the agent of a pod's istio-proxy container (Istio's pilot-agent proxy): reads the ProxyConfig " +
			"(mesh config < PROXY_CONFIG < proxy.istio.io/config annotation), writes Envoy's bootstrap, starts Envoy " +
			"and drains it on SIGTERM. The type defaults to sidecar.",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			typ := ""
			if len(args) == 1 {
				typ = args[0]
			}
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer func() { _ = log.Sync() }()
			return runProxy(cmd.Context(), g, f, typ, log)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.domain, "domain", "", "DNS domain suffix; empty means ${POD_NAMESPACE}.svc.cluster.local")
	fl.StringVar(&f.meshConfig, "meshConfig", config.DefaultMeshConfigFile, "mesh config file; its defaultConfig is the ProxyConfig base (optional)")
	fl.Uint16Var(&f.stsPort, "stsPort", 0, "STS port put in the node metadata (0 = off)")
	fl.StringVar(&f.tokenManagerPlugin, "tokenManagerPlugin", "", "STS token manager plugin (accepted for Istio compatibility)")
	fl.StringVar(&f.serviceCluster, "serviceCluster", config.DefaultServiceCluster, "deprecated: service cluster when ProxyConfig.serviceCluster is empty")
	fl.StringVar(&f.proxyLogLevel, "proxyLogLevel", "warning", "Envoy log level: level[,component:level,...]")
	fl.StringVar(&f.proxyComponentLogLevel, "proxyComponentLogLevel", "", "Envoy component log levels (used when --proxyLogLevel has none)")
	fl.IntVar(&f.concurrency, "concurrency", 0, "legacy: Envoy worker threads, overrides ProxyConfig.concurrency")
	fl.StringVar(&f.templateFile, "templateFile", "", "Go text/template for the Envoy bootstrap")
	fl.StringVar(&f.outlierLogPath, "outlierLogPath", "", "outlier detection log path (node metadata)")
	fl.BoolVar(&f.profiling, "profiling", true, "serve /debug/pprof on the status port")
	return cmd
}

// component is one long-running part of proxy mode. The Envoy supervisor is
// the first; the xDS proxy, SDS server, DNS proxy and status server join it
// in proxyComponents.
type component interface {
	Run(ctx context.Context) error
}

// lifecycle is what the status server's endpoints need from proxy mode:
// readiness (Envoy's half of /healthz/ready), POST /drain and POST
// /quitquitquit.
type lifecycle struct {
	readiness *envoy.Readiness
	drain     func(context.Context) error
	quit      func()
}

// errQuit is the cause of the root context's end after /quitquitquit.
var errQuit = errors.New("quit requested (/quitquitquit)")

// runProxy is proxy mode: config → effective config logged → bootstrap
// generated, validated and written → all parts run in one errgroup. It
// returns nil when Envoy ends cleanly (drained, or exited 0) and an error
// carrying Envoy's exit code when Envoy fails.
func runProxy(ctx context.Context, g *globalFlags, f *proxyFlags, typeArg string, log *zap.Logger) error {
	typ, err := config.ParseProxyType(typeArg)
	if err != nil {
		return err
	}
	logLevels, err := envoy.ParseLogLevels(f.proxyLogLevel, f.proxyComponentLogLevel)
	if err != nil {
		return err
	}
	env := config.OSEnv()
	pod, err := config.ReadPodInfo("")
	if err != nil {
		return err
	}
	pc, err := config.Load(config.LoadOptions{
		MeshConfigFile: f.meshConfig,
		ServiceCluster: f.serviceCluster,
		Concurrency:    f.concurrency,
		TemplateFile:   f.templateFile,
		Env:            env,
		Pod:            pod,
	}, log.Named("config"))
	if err != nil {
		return err
	}
	pc.Log(log)

	bopts, err := bootstrap.OptionsFromEnv(env)
	if err != nil {
		return err
	}
	bopts.LogAsJSON = g.log.JSON
	bopts.OutlierLogPath = f.outlierLogPath
	node, err := config.NewNode(config.NodeOptions{
		Type:                        typ,
		Domain:                      f.domain,
		Env:                         env,
		Pod:                         pod,
		IstioVersion:                env.Get("ISTIO_VERSION"),
		StsPort:                     f.stsPort,
		OutlierLogPath:              f.outlierLogPath,
		EnvoyStatusPort:             bopts.EnvoyStatusPort,
		EnvoyPrometheusPort:         bopts.EnvoyPrometheusPort,
		ExitOnZeroActiveConnections: bopts.ExitOnZeroActiveConnections,
		MetadataDiscovery:           bopts.MetadataDiscovery,
	}, pc, log.Named("config"))
	if err != nil {
		return err
	}
	log.Info("node identity", zap.String("id", node.ID), zap.String("cluster", node.Cluster))

	ecfg, err := envoyConfig(pc, node, typ, logLevels, env)
	if err != nil {
		return err
	}
	if bopts.OverrideFile != "" {
		if ecfg.ConfigOverride, err = envoy.LoadOverride(bopts.OverrideFile, bopts.HostIP); err != nil {
			return err
		}
	}
	disableEnvoy, err := env.Bool("DISABLE_ENVOY", false)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var parts []component
	if disableEnvoy {
		log.Info("DISABLE_ENVOY is set: not starting Envoy")
		parts = append(parts, waitForShutdown{})
	} else {
		if ecfg.BootstrapPath, ecfg.RemoveBootstrap, err = writeBootstrap(pc, bootstrap.Params{Options: bopts, Node: node, Proxy: pc}); err != nil {
			return err
		}
		sup, err := envoy.New(ecfg, log)
		if err != nil {
			if ecfg.RemoveBootstrap {
				_ = os.Remove(ecfg.BootstrapPath)
			}
			return err
		}
		stop := skipDrainOnSecondSignal(sup)
		defer stop()
		lc := lifecycle{
			readiness: envoy.NewReadiness(sup.Admin(), sup.Draining, nil),
			drain:     sup.Drain,
			quit:      func() { sup.Quit(); cancel(errQuit) },
		}
		parts = append(parts, sup)
		parts = append(parts, proxyComponents(lc)...)
	}

	grp, gctx := errgroup.WithContext(ctx)
	for _, p := range parts {
		grp.Go(func() error { return p.Run(gctx) })
	}
	err = grp.Wait()
	var exit *envoy.ExitError
	if errors.As(err, &exit) {
		if exit.Code == 0 {
			return nil // Envoy exited cleanly: so does the agent
		}
		return withExitCode(exit.Code, err)
	}
	if err == nil {
		log.Info("agent stopped", zap.NamedError("cause", context.Cause(ctx)))
	}
	return err
}

// proxyComponents is where the xDS proxy, SDS server, DNS proxy and status
// server join proxy mode; lc is what the status server needs.
func proxyComponents(lc lifecycle) []component {
	_ = lc
	return nil
}

// waitForShutdown stands in for Envoy with DISABLE_ENVOY: it blocks until
// the agent is told to stop.
type waitForShutdown struct{}

func (waitForShutdown) Run(ctx context.Context) error {
	<-ctx.Done()
	return nil
}

// skipDrainOnSecondSignal makes a second SIGTERM/SIGINT cut the drain wait
// short. The first one cancels the root context (main's NotifyContext).
func skipDrainOnSecondSignal(sup *envoy.Proxy) (stop func()) {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		n := 0
		for {
			select {
			case <-sigs:
				if n++; n == 2 {
					sup.SkipDrain()
				}
			case <-done:
				return
			}
		}
	}()
	return func() {
		signal.Stop(sigs)
		close(done)
	}
}

// envoyConfig maps the effective ProxyConfig and env onto the supervisor's
// Config.
func envoyConfig(pc *config.ProxyConfig, node *config.Node, typ config.ProxyType, levels envoy.LogLevels, env config.Env) (envoy.Config, error) {
	c := envoy.DefaultConfig()
	c.BinaryPath = pc.BinaryPath
	c.Type = envoy.Router
	if typ == config.Sidecar {
		c.Type = envoy.Sidecar
	}
	c.DrainDuration = pc.DrainDuration
	c.TerminationDrainDuration = pc.TerminationDrainDuration
	if pc.FileFlushInterval > 0 {
		c.FileFlushInterval = pc.FileFlushInterval
	}
	c.FileFlushMinSizeKB = int(pc.FileFlushMinSizeKB)
	c.LogLevels = levels
	if pc.Concurrency != nil {
		c.Concurrency = int(*pc.Concurrency)
	}
	allV6 := len(node.IPs) > 0
	for _, ip := range node.IPs {
		allV6 = allV6 && ip.Is6() && !ip.Is4In6()
	}
	c.IPv6 = allV6
	localhost := netip.AddrFrom4([4]byte{127, 0, 0, 1})
	if allV6 {
		localhost = netip.IPv6Loopback()
	}
	c.Admin = netip.AddrPortFrom(localhost, pc.ProxyAdminPort)

	var err error
	boolEnv := func(dst *bool, key string) {
		if err == nil {
			*dst, err = env.Bool(key, *dst)
		}
	}
	durEnv := func(dst *time.Duration, key string) {
		if v := strings.TrimSpace(env.Get(key)); v != "" && err == nil {
			d, perr := config.ParseDuration(v)
			if perr != nil || d < 0 {
				err = fmt.Errorf("env %s: %q is not a duration (use e.g. 5s)", key, v)
				return
			}
			*dst = d
		}
	}
	boolEnv(&c.ExitOnZeroActiveConnections, "EXIT_ON_ZERO_ACTIVE_CONNECTIONS")
	durEnv(&c.MinimumDrainDuration, "MINIMUM_DRAIN_DURATION")
	boolEnv(&c.SkipDeprecatedLogs, "ENVOY_SKIP_DEPRECATED_LOGS")
	boolEnv(&c.EnableCoreDump, "ISTIO_ENVOY_ENABLE_CORE_DUMP")
	boolEnv(&c.RestartOnExit, "OUTRIGGER_ENVOY_RESTART")
	durEnv(&c.StopGrace, "OUTRIGGER_ENVOY_STOP_GRACE")
	return c, err
}

// writeBootstrap produces the file Envoy starts from: customConfigFile as
// is (validated, never removed), else the generated bootstrap, validated and
// written to <configPath>/envoy-rev.json (.yaml for a YAML template). An
// invalid bootstrap is an error here, before any Envoy process exists.
func writeBootstrap(pc *config.ProxyConfig, p bootstrap.Params) (path string, remove bool, err error) {
	if pc.CustomConfigFile != "" {
		data, err := os.ReadFile(pc.CustomConfigFile)
		if err != nil {
			return "", false, fmt.Errorf("customConfigFile: %w", err)
		}
		format := "json"
		if ext := filepath.Ext(pc.CustomConfigFile); ext == ".yaml" || ext == ".yml" {
			format = "yaml"
		}
		if err := bootstrap.Validate(data, format); err != nil {
			return "", false, fmt.Errorf("customConfigFile %s is not a valid Envoy bootstrap: %w", pc.CustomConfigFile, err)
		}
		return pc.CustomConfigFile, false, nil
	}
	data, format, err := bootstrap.Generate(p)
	if err != nil {
		return "", false, err
	}
	if err := bootstrap.Validate(data, format); err != nil {
		return "", false, fmt.Errorf("generated Envoy bootstrap is invalid (check the bootstrap template, ISTIO_BOOTSTRAP or --templateFile): %w", err)
	}
	if err := os.MkdirAll(pc.ConfigPath, 0o755); err != nil {
		return "", false, fmt.Errorf("create configPath %s: %w", pc.ConfigPath, err)
	}
	name := strings.TrimSuffix(config.DefaultBootstrapName, ".json") + "." + format
	path = filepath.Join(pc.ConfigPath, name)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		return "", false, fmt.Errorf("write Envoy bootstrap: %w", err)
	}
	return path, true, nil
}
