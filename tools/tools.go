//go:build tools

// Package tools pins the developer tools (staticcheck; h2spec, the HTTP/2
// conformance suite internal/h2grpc's tests run) in their own module, so
// their many requirements stay out of the product's go.mod.
package tools

import (
	_ "github.com/summerwind/h2spec/cmd/h2spec"
	_ "honnef.co/go/tools/cmd/staticcheck"
)
