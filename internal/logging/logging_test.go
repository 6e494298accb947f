package logging

import (
	"testing"

	"go.uber.org/zap/zapcore"
)

func TestDefaultLevel(t *testing.T) {
	tests := []struct {
		spec    string
		want    zapcore.Level
		wantErr bool
	}{
		{"", zapcore.InfoLevel, false},
		{"default:info", zapcore.InfoLevel, false},
		{"debug", zapcore.DebugLevel, false},
		{"default:warn,dns:debug", zapcore.WarnLevel, false},
		{"xdsproxy:debug", zapcore.InfoLevel, false},
		{"default:none", zapcore.FatalLevel + 1, false},
		{"default:loud", 0, true},
	}
	for _, tt := range tests {
		got, err := defaultLevel(tt.spec)
		if (err != nil) != tt.wantErr {
			t.Errorf("defaultLevel(%q) error = %v, wantErr %v", tt.spec, err, tt.wantErr)
			continue
		}
		if err == nil && got != tt.want {
			t.Errorf("defaultLevel(%q) = %v, want %v", tt.spec, got, tt.want)
		}
	}
}

func TestNewAcceptsIstioDefaults(t *testing.T) {
	// The defaults of Istio's log flags, as every pod spec passes them.
	for _, o := range []Options{
		{OutputLevel: "default:info", StacktraceLevel: "default:none"},
		{OutputLevel: "default:debug", StacktraceLevel: "default:error", JSON: true},
		{OutputLevel: "info"},
	} {
		if _, err := New(o); err != nil {
			t.Errorf("New(%+v): %v", o, err)
		}
	}
	if _, err := New(Options{OutputLevel: "info", StacktraceLevel: "default:sometimes"}); err == nil {
		t.Error("bad --log_stacktrace_level: want error")
	}
}
