//go:build tools

// Package tools pins the developer tools (staticcheck) in their own module, so
// their many requirements stay out of the product's go.mod.
package tools

import _ "honnef.co/go/tools/cmd/staticcheck"
