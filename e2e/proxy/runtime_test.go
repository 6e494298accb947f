package proxy

import (
	"net/http"
	"regexp"
	"testing"
	"time"

	"github.com/outrigger-mesh/outrigger/e2e/internal/testenv"
)

// TestRuntimeSettings: proxy mode runs Go on one P and with GOGC 25 unless
// the environment says otherwise, as the agent's own metrics report them.
func TestRuntimeSettings(t *testing.T) {
	testenv.RequireRoot(t)
	tests := []struct {
		name              string
		env               map[string]string
		wantProcs, wantGC string
	}{
		{name: "defaults", env: map[string]string{"GOMAXPROCS": "", "GOGC": ""}, wantProcs: "1", wantGC: "25"},
		{name: "operator's values", env: map[string]string{"GOMAXPROCS": "2", "GOGC": "80"}, wantProcs: "2", wantGC: "80"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := startAgent(t, agentOpts{env: tt.env})
			metrics := waitMetrics(t, a)
			for name, want := range map[string]string{"go_sched_gomaxprocs_threads": tt.wantProcs, "go_gc_gogc_percent": tt.wantGC} {
				m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindStringSubmatch(metrics)
				if m == nil || m[1] != want {
					t.Errorf("%s = %v, want %s", name, m, want)
				}
			}
		})
	}
}

// waitMetrics scrapes the status server's merged metrics once it answers.
func waitMetrics(t *testing.T, a *agent) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body, err := a.get(15020, "/stats/prometheus")
		if err == nil && code == http.StatusOK {
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("status server: %d %v", code, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
