package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"go.uber.org/zap"
	"sigs.k8s.io/yaml"
)

// ProxyType is the first argument of `proxy`: the node type in the node ID.
type ProxyType string

const (
	Sidecar      ProxyType = "sidecar"
	Router       ProxyType = "router"
	Waypoint     ProxyType = "waypoint"
	Ztunnel      ProxyType = "ztunnel"
	AgentGateway ProxyType = "agentgateway"
)

// ParseProxyType accepts the types Istio's `proxy` command accepts; "" is sidecar.
func ParseProxyType(s string) (ProxyType, error) {
	switch t := ProxyType(s); t {
	case "":
		return Sidecar, nil
	case Sidecar, Router, Waypoint, Ztunnel, AgentGateway:
		return t, nil
	}
	return "", fmt.Errorf("invalid proxy type %q (want sidecar, router, waypoint, ztunnel or agentgateway)", s)
}

// LoadOptions are the inputs of Load besides the files it reads.
type LoadOptions struct {
	// Root resolves Istio's relative paths (./etc/istio/...); "" = working dir.
	Root string
	// MeshConfigFile is --meshConfig. Default ./etc/istio/config/mesh; optional.
	MeshConfigFile string
	// ServiceCluster is --serviceCluster (deprecated). Default istio-proxy.
	ServiceCluster string
	// Concurrency is the legacy --concurrency flag; 0 = not given.
	Concurrency int
	// TemplateFile is --templateFile: sets proxyBootstrapTemplatePath unless
	// customConfigFile is set.
	TemplateFile string
	// Env is the process environment (PROXY_CONFIG, ISTIO_CPU_LIMIT).
	Env Env
	// Pod is the downward API info (annotations carry overrides).
	Pod PodInfo
}

// Load builds the effective ProxyConfig: Defaults() < the mesh config file's
// defaultConfig < PROXY_CONFIG < the proxy.istio.io/config annotation <
// the sidecar.istio.io/discoveryAddress and status.sidecar.istio.io/port
// annotations; then concurrency and serviceCluster from flags/env; then
// validation. Unknown fields are logged as warnings; bad values are errors
// that name the source and field.
func Load(opts LoadOptions, log *zap.Logger) (*ProxyConfig, error) {
	if log == nil {
		log = zap.NewNop()
	}
	p := Defaults()
	warn := func(ws []Warning) {
		for _, w := range ws {
			log.Warn("ignoring part of the proxy config", zap.String("source", w.Source),
				zap.String("field", w.Field), zap.String("problem", w.Message))
		}
	}

	meshFile := opts.MeshConfigFile
	if meshFile == "" {
		meshFile = DefaultMeshConfigFile
	}
	meshPath := Rooted(opts.Root, meshFile)
	if b, err := os.ReadFile(meshPath); err == nil {
		dc, err := meshDefaultConfig(b)
		if err != nil {
			return nil, fmt.Errorf("mesh config %s (--meshConfig): %w", meshFile, err)
		}
		if dc != nil {
			ws, err := overlay(p, "mesh config "+meshFile+" defaultConfig", dc)
			warn(ws)
			if err != nil {
				return nil, err
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read mesh config (--meshConfig): %w", err)
	}

	if v := opts.Env.Get("PROXY_CONFIG"); strings.TrimSpace(v) != "" {
		ws, err := overlay(p, "PROXY_CONFIG", []byte(v))
		warn(ws)
		if err != nil {
			return nil, err
		}
	}

	annos := opts.Pod.Annotations
	if v := annos[ProxyConfigAnnotation]; strings.TrimSpace(v) != "" {
		ws, err := overlay(p, "annotation "+ProxyConfigAnnotation, []byte(v))
		warn(ws)
		if err != nil {
			return nil, err
		}
	}
	if v, ok := annos[DiscoveryAnnotation]; ok {
		p.DiscoveryAddress = v
	}
	if v, ok := annos[StatusPortAnnotation]; ok {
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 16)
		if err != nil {
			return nil, &ValueError{Source: "annotation " + StatusPortAnnotation, Err: fmt.Errorf("%q is not a port (use 1-65535)", v)}
		}
		p.StatusPort = uint16(n)
	}

	if err := resolveConcurrency(p, opts, log); err != nil {
		return nil, err
	}
	if p.TracingServiceName == "" && p.ServiceCluster == "" {
		p.ServiceCluster = opts.ServiceCluster
		if p.ServiceCluster == "" {
			p.ServiceCluster = DefaultServiceCluster
		}
	}
	if opts.TemplateFile != "" && p.CustomConfigFile == "" {
		p.ProxyBootstrapTemplatePath = opts.TemplateFile
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return p, nil
}

// meshDefaultConfig extracts the defaultConfig document of a MeshConfig.
// Only defaultConfig matters to the agent; other mesh fields are istiod's.
func meshDefaultConfig(b []byte) ([]byte, error) {
	js, err := yaml.YAMLToJSON(b)
	if err != nil {
		return nil, fmt.Errorf("not valid YAML or JSON: %w", err)
	}
	var mesh map[string]json.RawMessage
	if err := json.Unmarshal(js, &mesh); err != nil {
		if string(js) == "null" {
			return nil, nil
		}
		return nil, fmt.Errorf("want a MeshConfig object, got %s", preview(js))
	}
	dc, ok := mesh["defaultConfig"]
	if !ok {
		dc = mesh["default_config"]
	}
	return dc, nil
}

// resolveConcurrency applies Istio's precedence: ProxyConfig.concurrency if
// set, else ISTIO_CPU_LIMIT when non-zero; the legacy --concurrency flag
// overrides both.
func resolveConcurrency(p *ProxyConfig, opts LoadOptions, log *zap.Logger) error {
	if p.Concurrency == nil {
		if v := strings.TrimSpace(opts.Env.Get("ISTIO_CPU_LIMIT")); v != "" {
			n, err := strconv.ParseInt(v, 10, 32)
			if err != nil || n < 0 {
				return fmt.Errorf("env ISTIO_CPU_LIMIT: %q is not a whole number of CPUs", v)
			}
			if n > 0 {
				c := int32(n)
				p.Concurrency = &c
			}
		}
	}
	if opts.Concurrency < 0 {
		return fmt.Errorf("--concurrency %d: must be 0 or more", opts.Concurrency)
	}
	if opts.Concurrency > 0 {
		log.Warn("--concurrency is deprecated; set concurrency in the ProxyConfig instead",
			zap.Int("concurrency", opts.Concurrency))
		c := int32(opts.Concurrency)
		p.Concurrency = &c
	}
	if p.ConcurrencyValue() == 0 {
		log.Warn("concurrency is 0: Envoy starts one worker per host CPU, which may be far more than the pod's CPU limit; set concurrency in the ProxyConfig or ISTIO_CPU_LIMIT")
	}
	return nil
}
