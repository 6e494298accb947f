// Package logging builds the agent's zap logger from Istio's log flags, so the
// flags in existing pod specs (--log_output_level, --log_as_json) keep working.
package logging

import (
	"fmt"
	"strings"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Options mirrors the subset of Istio's log flags that changes our output.
// The rest (--log_target, --log_caller, rotation) are accepted and ignored.
type Options struct {
	// OutputLevel is Istio's --log_output_level: "level" or
	// "scope:level,scope:level". Scopes we do not know are ignored; the level
	// of "default" (or the bare level) sets ours. Default "default:info".
	OutputLevel string
	// JSON is Istio's --log_as_json. Default false (console lines).
	JSON bool
	// StacktraceLevel is Istio's --log_stacktrace_level. Default "none".
	StacktraceLevel string
}

// ParseLevel turns an Istio level name into a zap level. Istio's "none" maps
// to a level above fatal, so nothing is logged.
func ParseLevel(s string) (zapcore.Level, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "debug":
		return zapcore.DebugLevel, nil
	case "info", "":
		return zapcore.InfoLevel, nil
	case "warn", "warning":
		return zapcore.WarnLevel, nil
	case "error":
		return zapcore.ErrorLevel, nil
	case "fatal":
		return zapcore.FatalLevel, nil
	case "none":
		return zapcore.FatalLevel + 1, nil
	}
	return 0, fmt.Errorf("unknown log level %q (want debug, info, warn, error, fatal or none)", s)
}

// defaultLevel extracts the level that applies to the whole agent from an
// Istio --log_output_level value.
func defaultLevel(spec string) (zapcore.Level, error) {
	level := zapcore.InfoLevel
	for _, part := range strings.Split(spec, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		scope, lvl, found := strings.Cut(part, ":")
		if !found {
			lvl, scope = scope, "default"
		}
		l, err := ParseLevel(lvl)
		if err != nil {
			return 0, fmt.Errorf("%q: %w", spec, err)
		}
		if scope == "default" || scope == "all" {
			level = l
		}
	}
	return level, nil
}

// New builds the root logger. Logs go to stderr, as Istio's do.
func New(o Options) (*zap.Logger, error) {
	level, err := defaultLevel(o.OutputLevel)
	if err != nil {
		return nil, fmt.Errorf("--log_output_level: %w", err)
	}
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.TimeKey = "time"
	encCfg.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	var enc zapcore.Encoder
	if o.JSON {
		enc = zapcore.NewJSONEncoder(encCfg)
	} else {
		encCfg.EncodeLevel = zapcore.LowercaseLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	}
	core := zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(stderr{})), zap.NewAtomicLevelAt(level))
	opts := []zap.Option{zap.ErrorOutput(zapcore.Lock(zapcore.AddSync(stderr{})))}
	// Istio's default is "default:none": the same scope:level syntax as
	// --log_output_level.
	st, err := defaultLevel(o.StacktraceLevel)
	if err != nil {
		return nil, fmt.Errorf("--log_stacktrace_level: %w", err)
	}
	if st <= zapcore.FatalLevel {
		opts = append(opts, zap.AddStacktrace(st))
	}
	return zap.New(core, opts...), nil
}
