// Package h2grpc carries gRPC streams over HTTP/2 as byte streams, for the
// agent's xDS proxy: Envoy (and proxyless gRPC) connect to the agent's unix
// socket through the Server; the agent reaches istiod through a ClientConn.
//
// The proxy relays ADS responses cut-through: it reads response body bytes as
// they arrive upstream and writes them downstream at once, instead of waiting
// for a whole (often several megabytes) DiscoveryResponse as grpc-go would.
// So streams here are plain io.Reader/io.Writer pairs over the HTTP/2 DATA
// payloads; the gRPC 5-byte length prefixes and protobufs are the caller's.
//
// The design keeps the data path short: one reader goroutine per connection
// parses frames; writers encode DATA frames straight into a per-connection
// buffered writer under a mutex, with no hand-off to a writer goroutine, and
// Flush writes the buffer out in one system call. Control frames the reader
// must answer (SETTINGS and PING acknowledgements, WINDOW_UPDATE, RST_STREAM)
// never wait for a writer blocked on a full socket: they are queued and sent
// by whoever holds the writer next, so the reader keeps reading.
package h2grpc
