package envoy

import (
	"fmt"
	"strconv"
	"strings"
)

// envoyLevels are the values Envoy's -l and --component-log-level accept.
var envoyLevels = map[string]bool{
	"trace": true, "debug": true, "info": true, "warning": true, "warn": true,
	"error": true, "critical": true, "off": true,
}

// LogLevels is Envoy's log configuration: the -l level and the
// --component-log-level list.
type LogLevels struct {
	// Level is Envoy's -l value, e.g. "warning". Empty means Envoy's default.
	Level string
	// Components is the comma-separated --component-log-level value, e.g.
	// "misc:error,upstream:debug". Empty means none.
	Components string
}

// ParseLogLevels turns Istio's --proxyLogLevel and --proxyComponentLogLevel
// into Envoy's flags. --proxyLogLevel may mix a bare level with comp:level
// pairs ("warning,misc:error"): the pairs become --component-log-level, and
// --proxyComponentLogLevel is used only when --proxyLogLevel has no pairs, as
// in Istio. Unlike Istio, which drops malformed entries with a warning and
// lets Envoy reject unknown levels at start, a bad value is an error here so
// the pod fails with a message naming the flag instead of an Envoy crash loop.
func ParseLogLevels(proxyLogLevel, proxyComponentLogLevel string) (LogLevels, error) {
	var out LogLevels
	var comps []string
	for _, part := range strings.Split(proxyLogLevel, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		fields := strings.Split(part, ":")
		switch len(fields) {
		case 1:
			if !envoyLevels[strings.ToLower(part)] {
				return LogLevels{}, fmt.Errorf("--proxyLogLevel: unknown level %q (want trace, debug, info, warning, error, critical or off)", part)
			}
			out.Level = strings.ToLower(part)
		case 2:
			if err := checkComponent(fields[0], fields[1]); err != nil {
				return LogLevels{}, fmt.Errorf("--proxyLogLevel: %w", err)
			}
			comps = append(comps, part)
		default:
			return LogLevels{}, fmt.Errorf("--proxyLogLevel: malformed entry %q (want level or component:level)", part)
		}
	}
	if len(comps) > 0 {
		out.Components = strings.Join(comps, ",")
		return out, nil
	}
	for _, part := range strings.Split(proxyComponentLogLevel, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		comp, lvl, ok := strings.Cut(part, ":")
		if !ok {
			return LogLevels{}, fmt.Errorf("--proxyComponentLogLevel: malformed entry %q (want component:level)", part)
		}
		if err := checkComponent(comp, lvl); err != nil {
			return LogLevels{}, fmt.Errorf("--proxyComponentLogLevel: %w", err)
		}
		comps = append(comps, part)
	}
	out.Components = strings.Join(comps, ",")
	return out, nil
}

func checkComponent(comp, lvl string) error {
	if comp == "" {
		return fmt.Errorf("empty component in %q", comp+":"+lvl)
	}
	if !envoyLevels[strings.ToLower(lvl)] {
		return fmt.Errorf("unknown level %q for component %q", lvl, comp)
	}
	return nil
}

// Args returns Envoy's command line (without the binary), in the order
// Istio's agent builds it, so `ps` output and Envoy's own logs match what
// operators know.
func (c *Config) Args() []string {
	ipVersion := "v4"
	if c.IPv6 {
		ipVersion = "v6"
	}
	args := []string{
		"-c", c.BootstrapPath,
		"--drain-time-s", strconv.Itoa(int(c.DrainDuration.Seconds())),
		"--drain-strategy", "immediate",
		"--local-address-ip-version", ipVersion,
		"--file-flush-interval-msec", strconv.FormatInt(c.FileFlushInterval.Milliseconds(), 10),
		"--disable-hot-restart",
		"--allow-unknown-static-fields",
	}
	if c.FileFlushMinSizeKB > 0 {
		args = append(args, "--file-flush-min-size-kb", strconv.Itoa(c.FileFlushMinSizeKB))
	}
	if c.LogLevels.Level != "" {
		args = append(args, "-l", c.LogLevels.Level)
	}
	if c.LogLevels.Components != "" {
		args = append(args, "--component-log-level", c.LogLevels.Components)
	}
	if c.SkipDeprecatedLogs {
		args = append(args, "--skip-deprecated-logs")
	}
	if c.EnableCoreDump {
		args = append(args, "--enable-core-dump")
	}
	if c.ConfigOverride != "" {
		args = append(args, "--config-yaml", c.ConfigOverride)
	}
	if c.Concurrency > 0 {
		args = append(args, "--concurrency", strconv.Itoa(c.Concurrency))
	}
	return args
}
