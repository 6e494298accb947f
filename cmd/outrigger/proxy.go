package main

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/outrigger-mesh/outrigger/agent/bootstrap"
	"github.com/outrigger-mesh/outrigger/agent/config"
	"github.com/outrigger-mesh/outrigger/agent/envoy"
	"github.com/outrigger-mesh/outrigger/internal/maxprocs"
	"github.com/outrigger-mesh/outrigger/internal/memlimit"
	"github.com/outrigger-mesh/outrigger/internal/memtrim"
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

// component is one long-running part of proxy mode: the Envoy supervisor,
// the xDS proxy, the SDS server, the DNS proxy and the status server.
type component interface {
	Run(ctx context.Context) error
}

// errQuit is the cause of the root context's end after /quitquitquit.
var errQuit = errors.New("quit requested (/quitquitquit)")

// runProxy is proxy mode: config → effective config logged → bootstrap
// generated, validated and written → all parts run in one errgroup. It
// returns nil when Envoy ends cleanly (drained, or exited 0) and an error
// carrying Envoy's exit code when Envoy fails.
func runProxy(ctx context.Context, g *globalFlags, f *proxyFlags, typeArg string, log *zap.Logger) error {
	start := time.Now()
	signals := countSignals()
	defer signals.stop()
	// GC settings for a long-lived process sharing its container with
	// Envoy: GOGC 25 unless set, and a soft memory limit at half of the
	// container's cgroup limit unless GOMEMLIMIT is set (Envoy needs the
	// rest; Istio uses 90%, as if the agent were alone).
	if res, err := memlimit.Apply(memlimit.Config{Getenv: os.Getenv, FS: os.DirFS("/"), CgroupFraction: 0.5}); err != nil {
		log.Warn("cannot read the container's memory limit; no soft memory limit set", zap.Error(err))
	} else {
		log.Debug("memory settings", zap.Int("gogc", res.GCPercent), zap.Int64("memory_limit", res.MemoryLimit),
			zap.Int64("cgroup_limit", res.CgroupLimit))
	}
	// One P unless GOMAXPROCS is set: see internal/maxprocs.
	procs := maxprocs.Apply(os.Getenv, maxprocs.Default)
	log.Debug("cpu settings", zap.Int("gomaxprocs", procs))
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
	// Istio exports proxyMetadata into the agent's environment: settings
	// such as ISTIO_META_DNS_CAPTURE or EXIT_ON_ZERO_ACTIVE_CONNECTIONS work
	// from there, for the agent and for Envoy.
	env = config.EffectiveEnv(env, pc)

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

	ecfg, err := envoyConfig(pc, node, typ, logLevels, env, agentLoopback(node, bopts))
	if err != nil {
		return err
	}
	disableEnvoy, err := env.Bool("DISABLE_ENVOY", false)
	if err != nil {
		return err
	}
	// Outrigger only: how long after start the agent hands the pages it
	// touched only while starting back to the kernel (0 turns it off).
	r := envReader{env: env}
	memtrimDelay := r.duration("OUTRIGGER_MEMTRIM_DELAY", 5*time.Second)
	if r.err != nil {
		return r.err
	}
	// Every part is configured (and its configuration checked) before
	// anything starts: a bad setting is an error with no Envoy spawned.
	parts, err := newProxyParts(partsInput{
		pc: pc, node: node, env: env, typ: typ, flags: f,
		bopts: bopts, disableEnvoy: disableEnvoy, start: start,
	}, log)
	if err != nil {
		return err
	}
	defer parts.close()

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var sup *envoy.Proxy
	var main component = waitForShutdown{}
	if ctx.Err() != nil {
		// Told to stop while starting: there is nothing to drain.
		log.Info("shutdown requested before Envoy started; not starting it", zap.NamedError("cause", context.Cause(ctx)))
		return nil
	}
	if disableEnvoy {
		log.Info("DISABLE_ENVOY is set: not starting Envoy")
	} else {
		res, err := bootstrap.Prepare(bootstrap.Params{Options: bopts, Node: node, Proxy: pc})
		if err != nil {
			return err
		}
		ecfg.BootstrapPath, ecfg.RemoveBootstrap, ecfg.ConfigOverride = res.ConfigPath, res.Generated, res.ConfigYAML
		// Generating and validating the bootstrap builds every Envoy proto
		// descriptor once; hand that garbage back to the OS now rather than
		// keep it resident for the pod's life.
		debug.FreeOSMemory()
		if parts.health != nil {
			ecfg.OnExit = func(*envoy.ExitError) { parts.health.EnvoyExited() }
		}
		if sup, err = envoy.New(ecfg, log); err != nil {
			if ecfg.RemoveBootstrap {
				_ = os.Remove(ecfg.BootstrapPath)
			}
			return err
		}
		signals.onSecond(sup.SkipDrain)
		main = sup
	}
	parts.wireLifecycle(sup, func() {
		if sup != nil {
			sup.Quit()
		}
		cancel(errQuit)
	})

	// Envoy (or, without Envoy, the wait for a signal) runs on the root
	// context. The other parts outlive it: during the drain Envoy still
	// needs its xDS stream, its certificates and DNS, and kubelet still
	// needs answers (503) from the status server. They stop once Envoy is
	// gone, or when one of them fails.
	grp, gctx := errgroup.WithContext(ctx)
	partsCtx, stopParts := context.WithCancel(context.WithoutCancel(ctx))
	defer stopParts()
	context.AfterFunc(gctx, parts.beginShutdown)
	grp.Go(func() error {
		defer stopParts()
		return main.Run(gctx)
	})
	for _, p := range parts.components {
		grp.Go(func() error {
			err := p.Run(partsCtx)
			if err != nil {
				cancel(err)
			}
			return err
		})
	}
	if memtrimDelay > 0 {
		// The first seconds (bootstrap, first xDS push, certificates) touch
		// most of the binary once; the pod then runs for days on a small
		// part of it.
		t := time.AfterFunc(memtrimDelay, func() {
			if n, err := memtrim.Trim(); err != nil {
				log.Debug("memory trim failed", zap.Error(err))
			} else {
				log.Debug("returned start-up pages to the kernel", zap.Int64("bytes", n))
			}
		})
		defer t.Stop()
	}
	err = grp.Wait()
	log.Info("agent stopped", zap.NamedError("cause", context.Cause(ctx)), zap.Duration("uptime", time.Since(start)))
	var exit *envoy.ExitError
	if errors.As(err, &exit) {
		if exit.Code == 0 {
			return nil // Envoy exited cleanly: so does the agent
		}
		return withExitCode(exit.Code, err)
	}
	return err
}

// waitForShutdown stands in for Envoy with DISABLE_ENVOY: it blocks until
// the agent is told to stop.
type waitForShutdown struct{}

func (waitForShutdown) Run(ctx context.Context) error {
	<-ctx.Done()
	return nil
}

// signalCounter counts SIGTERM/SIGINT from the start of proxy mode. The
// first cancels the root context (main's NotifyContext); the second skips
// the drain wait, even if it arrived before Envoy was started.
type signalCounter struct {
	sigs chan os.Signal
	done chan struct{}

	mu     sync.Mutex
	n      int
	second func()
}

func countSignals() *signalCounter {
	c := &signalCounter{sigs: make(chan os.Signal, 2), done: make(chan struct{})}
	signal.Notify(c.sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		for {
			select {
			case <-c.sigs:
				c.mu.Lock()
				c.n++
				n, fn := c.n, c.second
				c.mu.Unlock()
				if n == 2 && fn != nil {
					fn()
				}
			case <-c.done:
				return
			}
		}
	}()
	return c
}

// onSecond runs fn on the second signal, or now if it has come already.
func (c *signalCounter) onSecond(fn func()) {
	c.mu.Lock()
	c.second = fn
	n := c.n
	c.mu.Unlock()
	if n >= 2 {
		fn()
	}
}

func (c *signalCounter) stop() {
	signal.Stop(c.sigs)
	close(c.done)
}

// agentLoopback is where the agent reaches Envoy's admin API and Envoy's
// Prometheus listener: the loopback address the bootstrap gives Envoy's
// admin. Deriving it anywhere else (from INSTANCE_IP alone, say) breaks the
// drain and readiness on dual-stack pods whose first IP is IPv6.
func agentLoopback(node *config.Node, bopts bootstrap.Options) netip.Addr {
	return bootstrap.Loopback(node.IPs, bopts.DualStack)
}

// envoyConfig maps the effective ProxyConfig and env onto the supervisor's
// Config. loopback is agentLoopback's address for Envoy's admin.
func envoyConfig(pc *config.ProxyConfig, node *config.Node, typ config.ProxyType, levels envoy.LogLevels, env config.Env, loopback netip.Addr) (envoy.Config, error) {
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
	c.Admin = netip.AddrPortFrom(loopback, pc.ProxyAdminPort)

	r := envReader{env: env}
	c.ExitOnZeroActiveConnections = r.bool("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", c.ExitOnZeroActiveConnections)
	c.MinimumDrainDuration = r.duration("MINIMUM_DRAIN_DURATION", c.MinimumDrainDuration)
	c.SkipDeprecatedLogs = r.bool("ENVOY_SKIP_DEPRECATED_LOGS", c.SkipDeprecatedLogs)
	c.EnableCoreDump = r.bool("ISTIO_ENVOY_ENABLE_CORE_DUMP", c.EnableCoreDump)
	c.RestartOnExit = r.bool("OUTRIGGER_ENVOY_RESTART", c.RestartOnExit)
	c.StopGrace = r.duration("OUTRIGGER_ENVOY_STOP_GRACE", c.StopGrace)
	// Envoy gets the agent's environment with proxyMetadata applied, as in
	// Istio.
	c.Env = env.List()
	return c, r.err
}
