package main

import (
	"encoding/json"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// Set at link time by the Makefile (-X main.version=...).
var version = "dev"

type buildInfo struct {
	Version   string `json:"version"`
	GitRev    string `json:"revision"`
	GoVersion string `json:"golang_version"`
	Status    string `json:"status"`
}

func currentBuild() buildInfo {
	b := buildInfo{Version: version, GoVersion: runtime.Version(), Status: "Clean", GitRev: "unknown"}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				b.GitRev = s.Value
			case "vcs.modified":
				if s.Value == "true" {
					b.Status = "Modified"
				}
			}
		}
	}
	return b
}

func newVersionCmd() *cobra.Command {
	var short bool
	var output string
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the build information",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			b := currentBuild()
			w := cmd.OutOrStdout()
			switch output {
			case "":
				if short {
					fmt.Fprintln(w, b.Version)
					return nil
				}
				fmt.Fprintf(w, "outrigger version: %#v\n", b)
			case "json":
				out, _ := json.MarshalIndent(map[string]any{"clientVersion": b}, "", "  ")
				fmt.Fprintln(w, string(out))
			case "yaml":
				fmt.Fprintf(w, "clientVersion:\n  golang_version: %s\n  revision: %s\n  status: %s\n  version: %s\n",
					b.GoVersion, b.GitRev, b.Status, b.Version)
			default:
				return fmt.Errorf("--output %q: want yaml or json", output)
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&short, "short", "s", false, "print only the version")
	cmd.Flags().StringVarP(&output, "output", "o", "", "output format: yaml or json")
	return cmd
}
