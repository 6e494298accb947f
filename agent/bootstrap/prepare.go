package bootstrap

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"google.golang.org/protobuf/proto"

	"github.com/outrigger-mesh/outrigger/agent/config"
)

// Result is what the supervisor starts Envoy with.
type Result struct {
	// ConfigPath is Envoy's -c.
	ConfigPath string
	// Generated is true when the agent wrote ConfigPath; remove it after
	// Envoy exits (Istio does). A customConfigFile is never removed.
	Generated bool
	// ConfigYAML is Envoy's --config-yaml: ISTIO_BOOTSTRAP_OVERRIDE as JSON
	// after $(HOST_IP) substitution; "" when there is no override.
	ConfigYAML string
}

// Prepare produces and checks the config Envoy starts with:
//   - customConfigFile set: that file, as-is (validated, not rewritten);
//   - else the template (ISTIO_BOOTSTRAP > proxyBootstrapTemplatePath) or the
//     built-in bootstrap, validated and written atomically to
//     <configPath>/envoy-rev.json (.yaml for a YAML template);
//   - ISTIO_BOOTSTRAP_OVERRIDE, when set, is validated merged over it, the
//     way Envoy applies --config-yaml.
//
// Errors name the file and the field path.
func Prepare(p Params) (Result, error) {
	if err := p.check(); err != nil {
		return Result{}, err
	}
	var res Result
	var data []byte
	var format string
	if f := p.Proxy.CustomConfigFile; f != "" {
		var err error
		res.ConfigPath = config.Rooted(p.Root, f)
		if data, err = os.ReadFile(res.ConfigPath); err != nil {
			return Result{}, fmt.Errorf("customConfigFile: %w", err)
		}
		format = formatOf(f)
	} else {
		var err error
		if data, format, err = Generate(p); err != nil {
			return Result{}, err
		}
		name := config.DefaultBootstrapName
		if format == "yaml" {
			name = strings.TrimSuffix(name, ".json") + ".yaml"
		}
		res.ConfigPath = config.Rooted(p.Root, path.Join(p.Proxy.ConfigPath, name))
	}
	base, err := parse(data, format)
	if err != nil {
		return Result{}, fileError(res.ConfigPath, err)
	}
	if p.OverrideFile != "" {
		js, err := loadOverride(p, base)
		if err != nil {
			return Result{}, err
		}
		res.ConfigYAML = string(js)
	}
	if p.Proxy.CustomConfigFile == "" {
		if err := Write(res.ConfigPath, data); err != nil {
			return Result{}, err
		}
		res.Generated = true
	}
	return res, nil
}

// fileError prefixes every line of a validation error with the file.
func fileError(file string, err error) error {
	errs := unwrapJoined(err)
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = fmt.Errorf("bootstrap %s: %w", filepath.Base(file), e)
	}
	return errors.Join(out...)
}

// loadOverride reads ISTIO_BOOTSTRAP_OVERRIDE, substitutes $(HOST_IP),
// validates it alone (field paths) and merged over base (constraints that
// only hold for the whole), and returns it as JSON for --config-yaml.
func loadOverride(p Params, base *bootstrapv3.Bootstrap) ([]byte, error) {
	raw, err := os.ReadFile(config.Rooted(p.Root, p.OverrideFile))
	if err != nil {
		return nil, fmt.Errorf("ISTIO_BOOTSTRAP_OVERRIDE: %w", err)
	}
	text := strings.ReplaceAll(string(raw), "$(HOST_IP)", p.HostIP)
	js, err := documentJSON([]byte(text), "yaml")
	if err != nil {
		return nil, fileError(p.OverrideFile, err)
	}
	over := &bootstrapv3.Bootstrap{}
	if err := decodeStrict(js, over); err != nil {
		return nil, fileError(p.OverrideFile, err)
	}
	merged := proto.Clone(base).(*bootstrapv3.Bootstrap)
	proto.Merge(merged, over)
	if err := check(merged); err != nil {
		return nil, fmt.Errorf("ISTIO_BOOTSTRAP_OVERRIDE %s merged over the bootstrap: %w", p.OverrideFile, err)
	}
	return js, nil
}

// Write stores data at path atomically (temp file and rename in the same
// directory), creating the directory, so Envoy never reads a partial file.
func Write(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write bootstrap: %w", err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write bootstrap: %w", err)
	}
	tmp := f.Name()
	_, werr := f.Write(data)
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Chmod(tmp, 0o644)
	}
	if werr == nil {
		werr = os.Rename(tmp, path)
	}
	if werr != nil {
		os.Remove(tmp)
		return fmt.Errorf("write bootstrap %s: %w", path, werr)
	}
	return nil
}
