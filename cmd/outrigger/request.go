package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// requestPorts are the ports `request` may talk to, as in Istio: Envoy
// admin, the status server, the readiness port and istiod's debug port.
var requestPorts = []int{15000, 15004, 15020, 15021}

// requestTimeout bounds one `request`, as in Istio.
const requestTimeout = 60 * time.Second

func newRequestCmd() *cobra.Command {
	var port int
	cmd := &cobra.Command{
		Use:   "request <METHOD> <PATH> [<BODY>]",
		Short: "Make an HTTP request to Envoy's admin API or the agent's status server",
		Long: "Sends an HTTP request to http://localhost:<--debug-port>/<PATH> and prints the response body " +
			"(Istio's pilot-agent request; the native-sidecar preStop hook is `request --debug-port=15020 POST drain`).",
		Args: cobra.RangeArgs(2, 3),
		PreRunE: func(*cobra.Command, []string) error {
			if !slices.Contains(requestPorts, port) {
				return fmt.Errorf("debug port %d is not in allowed list %v", port, requestPorts)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			body := ""
			if len(args) == 3 {
				body = args[2]
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), requestTimeout)
			defer cancel()
			return doRequest(ctx, cmd.OutOrStdout(), fmt.Sprintf("http://localhost:%d", port), args[0], args[1], body)
		},
	}
	cmd.Flags().IntVar(&port, "debug-port", 15000, "port to send the request to: 15000 (Envoy admin), 15020, 15021 or 15004")
	return cmd
}

// doRequest sends method base/path with body and copies the response body
// to out. A status above 399 is an error, except 404 (Istio's rule: a
// missing endpoint is reported, not fatal).
func doRequest(ctx context.Context, out io.Writer, base, method, path, body string) error {
	url := base + "/" + strings.TrimPrefix(path, "/")
	var rb io.Reader
	if body != "" {
		rb = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rb)
	if err != nil {
		return fmt.Errorf("request %s %s: %w", method, url, err)
	}
	client := &http.Client{}
	defer client.CloseIdleConnections()
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("request %s %s: %w", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("request %s %s: read response: %w", method, url, err)
	}
	if resp.StatusCode > 399 && resp.StatusCode != http.StatusNotFound {
		return fmt.Errorf("received unsuccessful status code %d: %s", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	_, err = out.Write(b)
	return err
}
