// Package controlplane is the test control plane: go-control-plane's ADS
// server and snapshot cache, serving a mesh described in a small YAML or
// JSON file as clusters, endpoints, listeners, routes and the DNS name
// table (NDS), over plaintext or TLS with a bearer-token check. Tests start,
// stop and restart it on the same address to play an istiod outage.
package controlplane

import (
	"fmt"
	"net/netip"
	"os"

	"sigs.k8s.io/yaml"
)

// Mesh is the file format.
//
//	services:
//	- name: reviews
//	  namespace: default
//	  vip: 10.96.0.10
//	  ports: [{port: 9080, protocol: http}]
//	  endpoints: [{ip: 10.1.0.5}, {ip: 10.1.0.6, port: 19080}]
type Mesh struct {
	Services []Service `json:"services"`
	// ClusterPadding adds a metadata string of this many bytes to every
	// cluster, to reach istiod's cluster sizes (about 2 KB each) in size
	// tests. Zero adds nothing.
	ClusterPadding int `json:"clusterPadding,omitempty"`
}

// Service is one Kubernetes-like service.
type Service struct {
	Name      string     `json:"name"`
	Namespace string     `json:"namespace"`
	VIP       string     `json:"vip"`
	Ports     []Port     `json:"ports"`
	Endpoints []Endpoint `json:"endpoints"`
}

// Port is a service port. Protocol is tcp (default), http or grpc.
type Port struct {
	Port     uint32 `json:"port"`
	Protocol string `json:"protocol,omitempty"`
}

// Endpoint is a backend; Port defaults to the service port.
type Endpoint struct {
	IP   string `json:"ip"`
	Port uint32 `json:"port,omitempty"`
}

// Host is the service's cluster-local name.
func (s Service) Host() string { return s.Name + "." + s.Namespace + ".svc.cluster.local" }

// LoadMesh reads a mesh file.
func LoadMesh(path string) (Mesh, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Mesh{}, fmt.Errorf("controlplane: read mesh: %w", err)
	}
	var m Mesh
	if err := yaml.UnmarshalStrict(b, &m); err != nil {
		return Mesh{}, fmt.Errorf("controlplane: mesh %s: %w", path, err)
	}
	return m, m.Validate()
}

// Validate checks addresses and names.
func (m Mesh) Validate() error {
	for i, s := range m.Services {
		if s.Name == "" || s.Namespace == "" {
			return fmt.Errorf("controlplane: services[%d]: name and namespace are required", i)
		}
		if _, err := netip.ParseAddr(s.VIP); err != nil {
			return fmt.Errorf("controlplane: service %s: vip: %w", s.Name, err)
		}
		for j, e := range s.Endpoints {
			if _, err := netip.ParseAddr(e.IP); err != nil {
				return fmt.Errorf("controlplane: service %s: endpoints[%d].ip: %w", s.Name, j, err)
			}
		}
		if len(s.Ports) == 0 {
			return fmt.Errorf("controlplane: service %s: no ports", s.Name)
		}
	}
	return nil
}

// GenerateMesh builds n HTTP services with two endpoints each and clusters
// padded to istiod-like sizes: n=3000 gives a CDS response of about 7 MB.
func GenerateMesh(n int) Mesh {
	m := Mesh{ClusterPadding: 2000}
	for i := range n {
		vip := netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)})
		m.Services = append(m.Services, Service{
			Name:      fmt.Sprintf("svc-%04d", i),
			Namespace: fmt.Sprintf("ns-%02d", i%50),
			VIP:       vip.String(),
			Ports:     []Port{{Port: 8080, Protocol: "http"}},
			Endpoints: []Endpoint{
				{IP: netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}).String()},
				{IP: netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}).String()},
			},
		})
	}
	return m
}
