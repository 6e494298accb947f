package config

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Env is the process environment as a map, so tests inject their own and
// the metadata builder can list every ISTIO_META_* variable.
type Env map[string]string

// OSEnv returns the agent's environment.
func OSEnv() Env { return EnvFromList(os.Environ()) }

// EnvFromList builds an Env from KEY=VALUE strings (os.Environ's format).
func EnvFromList(list []string) Env {
	e := make(Env, len(list))
	for _, kv := range list {
		if k, v, ok := strings.Cut(kv, "="); ok {
			e[k] = v
		}
	}
	return e
}

// Lookup is os.LookupEnv over e.
func (e Env) Lookup(key string) (string, bool) {
	v, ok := e[key]
	return v, ok
}

// Get returns the value of key, or "".
func (e Env) Get(key string) string { return e[key] }

// Bool parses key as a boolean with a default for unset or empty.
func (e Env) Bool(key string, def bool) (bool, error) {
	v, ok := e[key]
	if !ok || v == "" {
		return def, nil
	}
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "1", "t", "true", "yes", "on":
		return true, nil
	case "0", "f", "false", "no", "off":
		return false, nil
	}
	return def, fmt.Errorf("env %s: %q is not a boolean (use true or false)", key, v)
}

// Well-known paths, relative to the agent's working directory ("/" in a pod),
// as in Istio.
const (
	DefaultMeshConfigFile  = "./etc/istio/config/mesh"
	PodLabelsPath          = "./etc/istio/pod/labels"
	PodAnnotationsPath     = "./etc/istio/pod/annotations"
	DefaultSDSSocketPath   = "./var/run/secrets/workload-spiffe-uds/socket"
	DefaultXDSSocketName   = "XDS"
	DefaultBootstrapName   = "envoy-rev.json"
	ProxyConfigAnnotation  = "proxy.istio.io/config"
	DiscoveryAnnotation    = "sidecar.istio.io/discoveryAddress"
	StatusPortAnnotation   = "status.sidecar.istio.io/port"
	ExcludeIfaceAnnotation = "traffic.sidecar.istio.io/excludeInterfaces"
)

// Rooted resolves a relative well-known path against root. An empty root
// leaves it relative to the working directory, as Istio does; tests pass a
// temp dir. Absolute paths are returned unchanged.
func Rooted(root, path string) string {
	if root == "" || path == "" || filepath.IsAbs(path) {
		return path
	}
	return filepath.Join(root, path)
}

// List returns the environment as sorted KEY=value pairs, the form
// exec.Cmd.Env takes.
func (e Env) List() []string {
	out := make([]string, 0, len(e))
	for k, v := range e {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}
