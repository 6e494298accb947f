package maxprocs

import (
	"runtime"
	"testing"
)

func TestApply(t *testing.T) {
	was := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(was) })
	env := func(v string) func(string) string {
		return func(k string) string {
			if k == "GOMAXPROCS" {
				return v
			}
			return ""
		}
	}
	tests := []struct {
		name      string
		env       string
		n, before int
		want      int
	}{
		{name: "unset: the agent's value", n: Default, before: 4, want: Default},
		{name: "set by the operator: left alone", env: "3", n: Default, before: 3, want: 3},
		{name: "no value: left alone", n: 0, before: 2, want: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			runtime.GOMAXPROCS(tt.before)
			if got := Apply(env(tt.env), tt.n); got != tt.want {
				t.Errorf("Apply = %d, want %d", got, tt.want)
			}
			if got := runtime.GOMAXPROCS(0); got != tt.want {
				t.Errorf("GOMAXPROCS is %d, want %d", got, tt.want)
			}
		})
	}
}
