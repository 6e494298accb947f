package controlplane

import (
	"context"
	"fmt"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Client is a minimal Envoy stand-in for tests: one ADS stream, SotW or
// Delta, on the agent's unix socket, with ACKs and NACKs under the test's
// control.
type Client struct {
	conn   *grpc.ClientConn
	sotw   discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	delta  discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	node   *core.Node
	cancel context.CancelFunc
	sent   bool
}

// Response is one response as the client saw it.
type Response struct {
	TypeURL, Version, Nonce string
	// Names of the resources (Delta), or nil.
	Names   []string
	Removed []string
	// Count of resources.
	Count int
	// Sotw and Delta hold the decoded response.
	Sotw  *discovery.DiscoveryResponse
	Delta *discovery.DeltaDiscoveryResponse
}

// DialAgent opens an ADS stream on a unix socket as node id.
// Extra options go after the defaults (insecure, 1 GiB messages).
func DialAgent(ctx context.Context, socket string, delta bool, node *core.Node, opts ...grpc.DialOption) (*Client, error) {
	return DialADS(ctx, "unix://"+socket, delta, node, opts...)
}

// DialADS opens an ADS stream to a gRPC target (e.g. "unix:///path" or
// "127.0.0.1:15010" for the control plane directly).
func DialADS(ctx context.Context, target string, delta bool, node *core.Node, opts ...grpc.DialOption) (*Client, error) {
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1 << 30))}, opts...)
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	c := &Client{conn: conn, node: node, cancel: cancel}
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)
	if delta {
		c.delta, err = ads.DeltaAggregatedResources(ctx, grpc.WaitForReady(true))
	} else {
		c.sotw, err = ads.StreamAggregatedResources(ctx, grpc.WaitForReady(true))
	}
	if err != nil {
		cancel()
		conn.Close()
		return nil, fmt.Errorf("open ADS stream to %s: %w", target, err)
	}
	return c, nil
}

// Close ends the stream and the connection.
func (c *Client) Close() {
	c.cancel()
	c.conn.Close()
}

func (c *Client) nodeOnce() *core.Node {
	if c.sent {
		return nil
	}
	c.sent = true
	return c.node
}

// Subscribe sends a first request for typeURL (no names = wildcard).
// version and initial apply to SotW and Delta respectively.
func (c *Client) Subscribe(typeURL string, names []string, version string, initial map[string]string) error {
	if c.delta != nil {
		return c.delta.Send(&discovery.DeltaDiscoveryRequest{Node: c.nodeOnce(), TypeUrl: typeURL,
			ResourceNamesSubscribe: names, InitialResourceVersions: initial})
	}
	return c.sotw.Send(&discovery.DiscoveryRequest{Node: c.nodeOnce(), TypeUrl: typeURL, ResourceNames: names, VersionInfo: version})
}

// Recv waits for the next response.
func (c *Client) Recv() (*Response, error) {
	if c.delta != nil {
		r, err := c.delta.Recv()
		if err != nil {
			return nil, err
		}
		out := &Response{TypeURL: r.GetTypeUrl(), Version: r.GetSystemVersionInfo(), Nonce: r.GetNonce(),
			Removed: r.GetRemovedResources(), Count: len(r.GetResources()), Delta: r}
		for _, res := range r.GetResources() {
			out.Names = append(out.Names, res.GetName())
		}
		return out, nil
	}
	r, err := c.sotw.Recv()
	if err != nil {
		return nil, err
	}
	return &Response{TypeURL: r.GetTypeUrl(), Version: r.GetVersionInfo(), Nonce: r.GetNonce(), Count: len(r.GetResources()), Sotw: r}, nil
}

// ACK accepts r; names is the SotW subscription to repeat (nil: wildcard).
func (c *Client) ACK(r *Response, names []string) error {
	if c.delta != nil {
		return c.delta.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: r.TypeURL, ResponseNonce: r.Nonce})
	}
	return c.sotw.Send(&discovery.DiscoveryRequest{TypeUrl: r.TypeURL, ResourceNames: names, VersionInfo: r.Version, ResponseNonce: r.Nonce})
}

// NACK rejects r with msg; lastVersion is the SotW version still in use.
func (c *Client) NACK(r *Response, names []string, lastVersion, msg string) error {
	detail := &rpcstatus.Status{Code: 3, Message: msg}
	if c.delta != nil {
		return c.delta.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: r.TypeURL, ResponseNonce: r.Nonce, ErrorDetail: detail})
	}
	return c.sotw.Send(&discovery.DiscoveryRequest{TypeUrl: r.TypeURL, ResourceNames: names, VersionInfo: lastVersion,
		ResponseNonce: r.Nonce, ErrorDetail: detail})
}
