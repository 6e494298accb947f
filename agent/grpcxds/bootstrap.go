// Package grpcxds writes the bootstrap file for proxyless gRPC applications
// in the pod: grpc-go (and other gRPC languages) read GRPC_XDS_BOOTSTRAP and
// then speak xDS to the agent's socket, which the xDS proxy carries to the
// control plane like Envoy's stream.
package grpcxds

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// DefaultPath is where the bootstrap goes unless GRPC_XDS_BOOTSTRAP says
// otherwise (as Istio).
const DefaultPath = "./etc/istio/proxy/grpc-bootstrap.json"

// serverListenerTemplate is Istio's name for inbound listeners of xDS-enabled
// gRPC servers.
const serverListenerTemplate = "xds.istio.io/grpc/lds/inbound/%s"

// Bootstrap is what the file says.
type Bootstrap struct {
	// SocketPath is the xDS proxy's unix socket; made absolute.
	SocketPath string
	// NodeID is the proxy's node id (sidecar~IP~pod.ns~ns.svc.cluster.local).
	NodeID string
	// Metadata is the node metadata (as in Envoy's bootstrap); GENERATOR is
	// set to "grpc" so the control plane generates gRPC-flavoured config.
	Metadata map[string]any
	// Locality of the node; empty fields are left out.
	Locality Locality
}

// Locality is the node's region/zone/sub-zone.
type Locality struct {
	Region  string `json:"region,omitempty"`
	Zone    string `json:"zone,omitempty"`
	SubZone string `json:"sub_zone,omitempty"`
}

type file struct {
	XDSServers                         []server `json:"xds_servers"`
	Node                               node     `json:"node"`
	ServerListenerResourceNameTemplate string   `json:"server_listener_resource_name_template"`
}

type server struct {
	ServerURI      string        `json:"server_uri"`
	ChannelCreds   []channelCred `json:"channel_creds"`
	ServerFeatures []string      `json:"server_features"`
}

type channelCred struct {
	Type string `json:"type"`
}

type node struct {
	ID       string         `json:"id"`
	Metadata map[string]any `json:"metadata"`
	Locality *Locality      `json:"locality,omitempty"`
}

// Render returns the bootstrap JSON.
func Render(b Bootstrap) ([]byte, error) {
	sock, err := filepath.Abs(b.SocketPath)
	if err != nil {
		return nil, fmt.Errorf("grpcxds: socket path %q: %w", b.SocketPath, err)
	}
	md := make(map[string]any, len(b.Metadata)+1)
	for k, v := range b.Metadata {
		md[k] = v
	}
	md["GENERATOR"] = "grpc"
	f := file{
		XDSServers: []server{{
			ServerURI:      "unix://" + sock,
			ChannelCreds:   []channelCred{{Type: "insecure"}},
			ServerFeatures: []string{"xds_v3"},
		}},
		Node:                               node{ID: b.NodeID, Metadata: md},
		ServerListenerResourceNameTemplate: serverListenerTemplate,
	}
	if b.Locality != (Locality{}) {
		l := b.Locality
		f.Node.Locality = &l
	}
	out, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("grpcxds: encode bootstrap: %w", err)
	}
	return append(out, '\n'), nil
}

// Write renders b to path atomically (a temp file renamed over it), mode
// 0644, creating the directory with 0700 as Istio does.
func Write(path string, b Bootstrap) error {
	if strings.TrimSpace(path) == "" {
		return fmt.Errorf("grpcxds: empty GRPC_XDS_BOOTSTRAP path")
	}
	data, err := Render(b)
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("grpcxds: create directory for GRPC_XDS_BOOTSTRAP %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(dir, ".grpc-bootstrap-*")
	if err != nil {
		return fmt.Errorf("grpcxds: write GRPC_XDS_BOOTSTRAP %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("grpcxds: write GRPC_XDS_BOOTSTRAP %s: %w", path, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("grpcxds: chmod GRPC_XDS_BOOTSTRAP %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("grpcxds: write GRPC_XDS_BOOTSTRAP %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("grpcxds: write GRPC_XDS_BOOTSTRAP %s: %w", path, err)
	}
	return nil
}
