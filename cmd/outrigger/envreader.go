package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/outrigger-mesh/outrigger/agent/config"
)

// envReader turns environment variables into typed values at the edge. The
// first bad value is kept as err, naming the variable, the value and the
// expected form, so a caller checks once after reading everything.
type envReader struct {
	env config.Env
	err error
}

func (r *envReader) fail(key, v, want string) {
	if r.err == nil {
		r.err = fmt.Errorf("env %s: %q is not %s", key, v, want)
	}
}

func (r *envReader) str(key, def string) string {
	if v := strings.TrimSpace(r.env.Get(key)); v != "" {
		return v
	}
	return def
}

func (r *envReader) bool(key string, def bool) bool {
	v, err := r.env.Bool(key, def)
	if err != nil && r.err == nil {
		r.err = err
	}
	return v
}

func (r *envReader) duration(key string, def time.Duration) time.Duration {
	v := strings.TrimSpace(r.env.Get(key))
	if v == "" {
		return def
	}
	d, err := config.ParseDuration(v)
	if err != nil || d < 0 {
		r.fail(key, v, "a duration (use e.g. 5s)")
		return def
	}
	return d
}

func (r *envReader) float(key string, def float64) float64 {
	v := strings.TrimSpace(r.env.Get(key))
	if v == "" {
		return def
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		r.fail(key, v, "a number")
		return def
	}
	return f
}

func (r *envReader) int(key string, def int) int {
	v := strings.TrimSpace(r.env.Get(key))
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		r.fail(key, v, "an integer")
		return def
	}
	return n
}

// prefixed returns the variables named prefix+NAME as NAME → value (Istio's
// XDS_HEADER_* and CA_HEADER_*).
func (r *envReader) prefixed(prefix string) map[string]string {
	out := map[string]string{}
	for k, v := range r.env {
		if name, ok := strings.CutPrefix(k, prefix); ok && name != "" {
			out[name] = v
		}
	}
	return out
}
