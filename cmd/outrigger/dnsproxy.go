package main

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/outrigger-mesh/outrigger/dnsproxy"
)

// istioRootResolvConf is the resolv.conf Istio's agent uses in root ":53"
// mode (VMs and Docker, where the agent replaces the system resolver).
const istioRootResolvConf = "/var/lib/istio/resolv.conf"

// dnsProxyEnabled reports whether proxy mode starts the DNS proxy, as Istio
// decides it: ISTIO_META_DNS_CAPTURE for sidecars, ISTIO_META_ENABLE_DNS_SERVER
// for any proxy type.
func dnsProxyEnabled(getenv func(string) string, proxyType string) (bool, error) {
	capture, err := envBool(getenv, "ISTIO_META_DNS_CAPTURE", false)
	if err != nil {
		return false, err
	}
	server, err := envBool(getenv, "ISTIO_META_ENABLE_DNS_SERVER", false)
	if err != nil {
		return false, err
	}
	return (capture && proxyType == "sidecar") || server, nil
}

// dnsConfigFromEnv builds the DNS proxy's configuration from Istio's
// environment variables and Outrigger's DNS_CACHE* ones. uid decides the
// root ":53" mode as Istio does. The caller sets Registerer and, if it has a
// better one than "<POD_NAMESPACE>.svc.cluster.local", Domain.
func dnsConfigFromEnv(getenv func(string) string, uid int, log *zap.Logger) (dnsproxy.Config, error) {
	cfg := dnsproxy.Config{
		ListenAddr: getenv("DNS_PROXY_ADDR"),
		Namespace:  getenv("POD_NAMESPACE"),
	}
	if cfg.Namespace != "" {
		cfg.Domain = cfg.Namespace + ".svc.cluster.local"
	}
	if strings.HasSuffix(cfg.ListenAddr, ":53") {
		if uid == 0 {
			// Istio: answer before the first table and prefer the saved
			// resolv.conf, since /etc/resolv.conf points at us.
			cfg.RespondBeforeSync = true
			if _, err := os.Stat(istioRootResolvConf); err == nil {
				cfg.ResolvConf = istioRootResolvConf
			}
		} else {
			log.Error("DNS_PROXY_ADDR on port 53 needs root; using the default", zap.String("DNS_PROXY_ADDR", cfg.ListenAddr), zap.String("default", dnsproxy.DefaultListenAddr))
			cfg.ListenAddr = dnsproxy.DefaultListenAddr
		}
	}
	var err error
	if cfg.ForwardParallel, err = envBool(getenv, "DNS_FORWARD_PARALLEL", false); err != nil {
		return cfg, err
	}
	if v := getenv("DNS_FORWARD_TIMEOUT"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return cfg, fmt.Errorf("DNS_FORWARD_TIMEOUT=%q: want a positive duration such as 5s", v)
		}
		cfg.ForwardTimeout = d
	}
	cache, err := envBool(getenv, "DNS_CACHE", true)
	if err != nil {
		return cfg, err
	}
	cfg.CacheDisabled = !cache
	stale, err := envBool(getenv, "DNS_SERVE_STALE", true)
	if err != nil {
		return cfg, err
	}
	cfg.ServeStaleDisabled = !stale
	if v := getenv("DNS_CACHE_SIZE"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return cfg, fmt.Errorf("DNS_CACHE_SIZE=%q: want a positive number of entries", v)
		}
		cfg.CacheSize = n
	}
	return cfg, nil
}

// envBool parses a boolean env var the way Istio's env package does
// (strconv.ParseBool); unset means def.
func envBool(getenv func(string) string, name string, def bool) (bool, error) {
	v := getenv(name)
	if v == "" {
		return def, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("%s=%q: want true or false", name, v)
	}
	return b, nil
}

type dnsProxyFlags struct {
	nameTable        string
	listen           string
	namespace        string
	domain           string
	resolvConf       string
	allowNonLoopback bool
	upstreams        []string
}

func newDNSProxyCmd(g *globalFlags) *cobra.Command {
	f := &dnsProxyFlags{}
	cmd := &cobra.Command{
		Use:   "dns-proxy --name-table FILE [--listen ADDR]",
		Short: "Run the DNS proxy alone, with the name table from a JSON file",
		Long: `Runs the DNS proxy of proxy mode on its own. Mesh names come from a JSON file in
the shape /debug/ndsz prints ({"table": {"<host>": {"ips": [...], "registry": "Kubernetes",
"shortname": "...", "namespace": "...", "altHosts": [...]}}}), reloaded whenever the file
changes; everything else is forwarded to the resolv.conf nameservers. The DNS_FORWARD_*,
DNS_CACHE* and DNS_SERVE_STALE environment variables apply as in proxy mode.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer func() { _ = log.Sync() }()
			return runDNSProxy(cmd, f, log)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.nameTable, "name-table", "", "JSON file with the name table, in the /debug/ndsz shape (required)")
	fl.StringVar(&f.listen, "listen", "", "UDP and TCP listen address (default $DNS_PROXY_ADDR or "+dnsproxy.DefaultListenAddr+")")
	fl.StringVar(&f.namespace, "namespace", "", "namespace whose services answer to bare short names (default $POD_NAMESPACE)")
	fl.StringVar(&f.domain, "domain", "", "proxy domain for short names (default <namespace>.svc.cluster.local)")
	fl.StringVar(&f.resolvConf, "resolv-conf", dnsproxy.DefaultResolvConf, "resolv.conf with the upstream nameservers and search list")
	fl.BoolVar(&f.allowNonLoopback, "allow-non-loopback", false, "allow --listen on a non-loopback address")
	fl.StringSliceVar(&f.upstreams, "upstream", nil, "upstream resolver ip:port instead of the resolv.conf nameservers (repeatable)")
	_ = cmd.MarkFlagRequired("name-table")
	return cmd
}

func runDNSProxy(cmd *cobra.Command, f *dnsProxyFlags, log *zap.Logger) error {
	cfg, err := dnsConfigFromEnv(os.Getenv, os.Getuid(), log)
	if err != nil {
		return err
	}
	if f.listen != "" {
		cfg.ListenAddr = f.listen
	}
	if f.namespace != "" {
		cfg.Namespace = f.namespace
		cfg.Domain = f.namespace + ".svc.cluster.local"
	}
	if f.domain != "" {
		cfg.Domain = f.domain
	}
	if cfg.ResolvConf == "" || f.resolvConf != dnsproxy.DefaultResolvConf {
		cfg.ResolvConf = f.resolvConf
	}
	cfg.AllowNonLoopback = f.allowNonLoopback
	for _, u := range f.upstreams {
		ap, err := netip.ParseAddrPort(u)
		if err != nil {
			return fmt.Errorf("--upstream %q: want ip:port, e.g. 10.96.0.10:53", u)
		}
		cfg.Upstreams = append(cfg.Upstreams, ap)
	}
	// Fail on a broken file before binding anything.
	if _, err := dnsproxy.LoadNameTableFile(f.nameTable); err != nil {
		return fmt.Errorf("--name-table: %w", err)
	}
	srv, err := dnsproxy.New(cfg, log)
	if err != nil {
		return err
	}
	g, ctx := errgroup.WithContext(cmd.Context())
	g.Go(func() error { return srv.Run(ctx) })
	g.Go(func() error {
		if err := dnsproxy.WatchNameTableFile(ctx, f.nameTable, srv.UpdateNameTable, log.Named("dnsproxy")); err != nil {
			return fmt.Errorf("--name-table: %w", err)
		}
		return nil
	})
	return g.Wait()
}
