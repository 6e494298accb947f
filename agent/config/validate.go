package config

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"
)

// Validate checks the merged config the way Istio's
// ValidateMeshConfigProxyConfig does, with errors that name the field and
// what to use instead. All problems are reported together.
func (p *ProxyConfig) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("proxy config: field %s: %s", field, fmt.Sprintf(format, args...)))
	}
	if p.ConfigPath == "" {
		bad("configPath", "must not be empty (default %s)", DefaultConfigPath)
	}
	if p.BinaryPath == "" {
		bad("binaryPath", "must not be empty (default %s)", DefaultBinaryPath)
	}
	if p.DrainDuration <= 0 {
		bad("drainDuration", "%s must be greater than 0 (default 45s)", FormatDuration(p.DrainDuration))
	} else if p.DrainDuration%time.Millisecond != 0 {
		bad("drainDuration", "%s: only millisecond precision is supported", FormatDuration(p.DrainDuration))
	}
	if p.ParentShutdownDuration < 0 {
		bad("parentShutdownDuration", "%s must not be negative", FormatDuration(p.ParentShutdownDuration))
	}
	if p.TerminationDrainDuration < 0 {
		bad("terminationDrainDuration", "%s must not be negative (default 5s)", FormatDuration(p.TerminationDrainDuration))
	}
	if p.FileFlushInterval < 0 {
		bad("fileFlushInterval", "%s must not be negative", FormatDuration(p.FileFlushInterval))
	}
	if err := validateHostPort(p.DiscoveryAddress); err != nil {
		bad("discoveryAddress", "%q: %v (use host:port, e.g. %s)", p.DiscoveryAddress, err, DefaultDiscoveryAddress)
	}
	if p.ProxyAdminPort == 0 {
		bad("proxyAdminPort", "0 is not a port (use 1-65535, default %d)", DefaultProxyAdminPort)
	}
	if p.StatusPort == 0 {
		bad("statusPort", "0 is not a port (use 1-65535, default %d)", DefaultStatusPort)
	}
	if p.StatusPort != 0 && p.StatusPort == p.ProxyAdminPort {
		bad("statusPort", "%d is also proxyAdminPort; they must differ", p.StatusPort)
	}
	switch p.ControlPlaneAuthPolicy {
	case AuthNone, AuthMutualTLS:
	default:
		bad("controlPlaneAuthPolicy", "%q is not NONE or MUTUAL_TLS", p.ControlPlaneAuthPolicy)
	}
	if p.StatNameLength < 0 {
		bad("statNameLength", "%d must not be negative", p.StatNameLength)
	}
	if p.Concurrency != nil && *p.Concurrency < 0 {
		bad("concurrency", "%d must not be negative", *p.Concurrency)
	}
	return errors.Join(errs...)
}

func validateHostPort(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return errors.New("not host:port")
	}
	if host == "" {
		return errors.New("empty host")
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q is not 1-65535", port)
	}
	return nil
}
