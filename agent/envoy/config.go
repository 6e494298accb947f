package envoy

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"time"
)

// ProxyType decides which listeners a drain touches.
type ProxyType string

// Proxy types the agent runs Envoy as (Istio's `pilot-agent proxy <type>`).
const (
	Sidecar ProxyType = "sidecar"
	Router  ProxyType = "router"
)

// Config is what the supervisor needs to run one Envoy. Start from
// DefaultConfig; cmd fills it from ProxyConfig, flags and env.
type Config struct {
	// BinaryPath is Envoy's executable. ProxyConfig.binaryPath, default
	// /usr/local/bin/envoy.
	BinaryPath string
	// BootstrapPath is the file passed as -c. Under ProxyConfig.configPath,
	// default ./etc/istio/proxy/envoy-rev.json. Required.
	BootstrapPath string
	// RemoveBootstrap deletes BootstrapPath when the supervisor is done (not
	// between restarts), as Istio does for a generated bootstrap. False for a
	// customConfigFile.
	RemoveBootstrap bool
	// ConfigOverride is passed as --config-yaml: the contents of
	// ISTIO_BOOTSTRAP_OVERRIDE as JSON (see LoadOverride). Empty means none.
	ConfigOverride string
	// Type is the proxy type: a sidecar drains inbound listeners only, a
	// router all of them. Default sidecar.
	Type ProxyType
	// DrainDuration is Envoy's --drain-time-s. ProxyConfig.drainDuration,
	// default 45s.
	DrainDuration time.Duration
	// TerminationDrainDuration is how long the agent waits after draining
	// before stopping Envoy. ProxyConfig.terminationDrainDuration, default 5s.
	TerminationDrainDuration time.Duration
	// ExitOnZeroActiveConnections ends the drain wait once Envoy reports no
	// active downstream connections. Env EXIT_ON_ZERO_ACTIVE_CONNECTIONS,
	// default false.
	ExitOnZeroActiveConnections bool
	// MinimumDrainDuration is the wait before polling connections when
	// ExitOnZeroActiveConnections is on. Env MINIMUM_DRAIN_DURATION, default 5s.
	MinimumDrainDuration time.Duration
	// StopGrace is how long Envoy gets to exit after SIGTERM before SIGKILL.
	// Outrigger only (Istio sends SIGKILL at once): env
	// OUTRIGGER_ENVOY_STOP_GRACE, default 5s.
	StopGrace time.Duration
	// IPv6 selects --local-address-ip-version v6; true when every node IP is
	// IPv6, as in Istio.
	IPv6 bool
	// FileFlushInterval is --file-flush-interval-msec.
	// ProxyConfig.fileFlushInterval, default 1s.
	FileFlushInterval time.Duration
	// FileFlushMinSizeKB is --file-flush-min-size-kb when above 0.
	// ProxyConfig.fileFlushMinSizeKb, default 0.
	FileFlushMinSizeKB int
	// LogLevels are -l and --component-log-level, from --proxyLogLevel and
	// --proxyComponentLogLevel (see ParseLogLevels). Default level warning.
	LogLevels LogLevels
	// SkipDeprecatedLogs adds --skip-deprecated-logs. Env
	// ENVOY_SKIP_DEPRECATED_LOGS, default true.
	SkipDeprecatedLogs bool
	// EnableCoreDump adds --enable-core-dump. Env ISTIO_ENVOY_ENABLE_CORE_DUMP,
	// default false.
	EnableCoreDump bool
	// Concurrency is --concurrency when above 0. ProxyConfig.concurrency,
	// ISTIO_CPU_LIMIT or --concurrency; default 0 (Envoy's default).
	Concurrency int
	// Admin is Envoy's admin address. 127.0.0.1:ProxyConfig.proxyAdminPort
	// (::1 on IPv6-only pods), default 127.0.0.1:15000.
	Admin netip.AddrPort
	// RestartOnExit restarts an Envoy that exits on its own, with Backoff,
	// instead of ending the agent. Outrigger only: env
	// OUTRIGGER_ENVOY_RESTART, default false (Istio never restarts Envoy).
	RestartOnExit bool
	// OnExit, when set, is called each time Envoy exits on its own, before
	// a restart (RestartOnExit) or before Run returns. The status server
	// uses it to stop reporting a dead Envoy as ready. Outrigger only.
	OnExit func(*ExitError)
	// Backoff paces restarts when RestartOnExit is on.
	Backoff Backoff
	// Env is Envoy's environment. Nil means the agent's own, as in Istio.
	Env []string
	// Stdout and Stderr receive Envoy's output. Default: the agent's.
	Stdout, Stderr io.Writer
}

// DefaultConfig returns Istio's defaults. BootstrapPath must still be set.
func DefaultConfig() Config {
	return Config{
		BinaryPath:               "/usr/local/bin/envoy",
		BootstrapPath:            "./etc/istio/proxy/envoy-rev.json",
		Type:                     Sidecar,
		DrainDuration:            45 * time.Second,
		TerminationDrainDuration: 5 * time.Second,
		MinimumDrainDuration:     5 * time.Second,
		StopGrace:                5 * time.Second,
		FileFlushInterval:        time.Second,
		LogLevels:                LogLevels{Level: "warning"},
		SkipDeprecatedLogs:       true,
		Admin:                    netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), 15000),
		Backoff:                  DefaultBackoff(),
		Stdout:                   os.Stdout,
		Stderr:                   os.Stderr,
	}
}

func (c *Config) validate() error {
	var errs []error
	if c.BinaryPath == "" {
		errs = append(errs, errors.New("binary path is empty (set ProxyConfig.binaryPath)"))
	}
	if c.BootstrapPath == "" {
		errs = append(errs, errors.New("bootstrap path is empty"))
	}
	if c.Type != Sidecar && c.Type != Router {
		errs = append(errs, fmt.Errorf("proxy type %q: want sidecar or router", c.Type))
	}
	if c.DrainDuration < 0 || c.TerminationDrainDuration < 0 || c.MinimumDrainDuration < 0 || c.StopGrace < 0 {
		errs = append(errs, errors.New("drain durations must not be negative (drainDuration, terminationDrainDuration, MINIMUM_DRAIN_DURATION)"))
	}
	if !c.Admin.IsValid() || c.Admin.Port() == 0 {
		errs = append(errs, fmt.Errorf("admin address %s is invalid (set ProxyConfig.proxyAdminPort)", c.Admin))
	}
	if c.Concurrency < 0 {
		errs = append(errs, fmt.Errorf("concurrency %d is negative", c.Concurrency))
	}
	return errors.Join(errs...)
}
