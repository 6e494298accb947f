package envoy

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestArgs(t *testing.T) {
	tests := []struct {
		name   string
		modify func(*Config)
		want   string
	}{
		{
			name:   "default sidecar",
			modify: func(c *Config) { c.BootstrapPath = "etc/istio/proxy/envoy-rev.json" },
			want: "-c etc/istio/proxy/envoy-rev.json --drain-time-s 45 --drain-strategy immediate --local-address-ip-version v4 " +
				"--file-flush-interval-msec 1000 --disable-hot-restart --allow-unknown-static-fields -l warning --skip-deprecated-logs",
		},
		{
			name: "everything",
			modify: func(c *Config) {
				c.BootstrapPath = "b.json"
				c.DrainDuration = 10 * time.Second
				c.IPv6 = true
				c.FileFlushInterval = 250 * time.Millisecond
				c.FileFlushMinSizeKB = 64
				c.LogLevels = LogLevels{Level: "debug", Components: "misc:error,upstream:trace"}
				c.EnableCoreDump = true
				c.ConfigOverride = `{"admin":{}}`
				c.Concurrency = 2
			},
			want: "-c b.json --drain-time-s 10 --drain-strategy immediate --local-address-ip-version v6 " +
				"--file-flush-interval-msec 250 --disable-hot-restart --allow-unknown-static-fields --file-flush-min-size-kb 64 " +
				"-l debug --component-log-level misc:error,upstream:trace --skip-deprecated-logs --enable-core-dump " +
				`--config-yaml {"admin":{}} --concurrency 2`,
		},
		{
			name: "no skip-deprecated-logs, no level",
			modify: func(c *Config) {
				c.BootstrapPath = "b.json"
				c.SkipDeprecatedLogs = false
				c.LogLevels = LogLevels{}
			},
			want: "-c b.json --drain-time-s 45 --drain-strategy immediate --local-address-ip-version v4 " +
				"--file-flush-interval-msec 1000 --disable-hot-restart --allow-unknown-static-fields",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			tt.modify(&c)
			if diff := cmp.Diff(strings.Fields(tt.want), c.Args()); diff != "" {
				t.Errorf("Args() (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseLogLevels(t *testing.T) {
	tests := []struct {
		level, comp string
		want        LogLevels
		wantErr     string
	}{
		{level: "warning", want: LogLevels{Level: "warning"}},
		{level: "WARN", want: LogLevels{Level: "warn"}},
		{level: "info,misc:error", want: LogLevels{Level: "info", Components: "misc:error"}},
		{level: "misc:error,upstream:debug", want: LogLevels{Components: "misc:error,upstream:debug"}},
		// Component levels in --proxyLogLevel win over --proxyComponentLogLevel.
		{level: "info,misc:error", comp: "upstream:debug", want: LogLevels{Level: "info", Components: "misc:error"}},
		{level: "info", comp: "upstream:debug", want: LogLevels{Level: "info", Components: "upstream:debug"}},
		{level: "", want: LogLevels{}},
		{level: "loud", wantErr: `--proxyLogLevel: unknown level "loud"`},
		{level: "a:b:c", wantErr: `--proxyLogLevel: malformed entry "a:b:c"`},
		{level: "misc:loud", wantErr: `--proxyLogLevel: unknown level "loud" for component "misc"`},
		{level: "info", comp: "misc", wantErr: `--proxyComponentLogLevel: malformed entry "misc"`},
	}
	for _, tt := range tests {
		t.Run(tt.level+"/"+tt.comp, func(t *testing.T) {
			got, err := ParseLogLevels(tt.level, tt.comp)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestBackoffDelay(t *testing.T) {
	b := Backoff{Initial: time.Second, Max: 8 * time.Second}
	want := []time.Duration{1, 2, 4, 8, 8, 8}
	for i, w := range want {
		if got := b.delay(i); got != w*time.Second {
			t.Errorf("delay(%d) = %v, want %v", i, got, w*time.Second)
		}
	}
	b.Jitter = 0.5
	for i := range 50 {
		d := b.delay(3)
		if d > 8*time.Second || d < 4*time.Second {
			t.Fatalf("jittered delay #%d = %v, want within [4s, 8s]", i, d)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	c := DefaultConfig()
	c.BinaryPath = ""
	c.Type = "waypoint"
	c.TerminationDrainDuration = -time.Second
	_, err := New(c, nil)
	if err == nil {
		t.Fatal("New accepted an invalid config")
	}
	for _, want := range []string{"binaryPath", `"waypoint"`, "terminationDrainDuration"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}
