package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/outrigger-mesh/outrigger/internal/logging"
)

// globalFlags are the flags every subcommand accepts: Istio's log flags, so
// the command lines in existing pod specs keep working.
type globalFlags struct {
	log logging.Options
	// Accepted for compatibility with Istio's log flags; they do not change
	// Outrigger's output.
	logTarget, logCaller, logRotate                        string
	logRotateMaxAge, logRotateMaxSize, logRotateMaxBackups int
}

// logger builds the root logger from the parsed log flags.
func (g *globalFlags) logger() (*zap.Logger, error) {
	return logging.New(g.log)
}

func newRootCmd() *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:           "outrigger",
		Short:         "Sidecar agent for a service mesh pod, a drop-in for Istio's pilot-agent",
		SilenceUsage:  true,
		SilenceErrors: true,
		// Newer Istio templates may pass flags this build does not know yet;
		// Istio accepts them, so we do too, with a warning.
		FParseErrWhitelist: cobra.FParseErrWhitelist{UnknownFlags: true},
		PersistentPreRun: func(cmd *cobra.Command, _ []string) {
			for _, f := range unknownFlags(cmd, os.Args[1:]) {
				fmt.Fprintf(os.Stderr, "warning: ignoring unknown flag %s (accepted for compatibility with newer Istio templates)\n", f)
			}
		},
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.log.OutputLevel, "log_output_level", "default:info",
		"comma-separated scope:level list (levels: debug, info, warn, error, fatal, none); the default scope sets the agent's level")
	pf.BoolVar(&g.log.JSON, "log_as_json", false, "log as JSON lines instead of console text")
	pf.StringVar(&g.log.StacktraceLevel, "log_stacktrace_level", "default:none", "level from which stack traces are logged (accepted for Istio compatibility)")
	pf.StringVar(&g.logTarget, "log_target", "stdout", "accepted for Istio compatibility; logs always go to stderr")
	pf.StringVar(&g.logCaller, "log_caller", "", "accepted for Istio compatibility; ignored")
	pf.StringVar(&g.logRotate, "log_rotate", "", "accepted for Istio compatibility; ignored")
	pf.IntVar(&g.logRotateMaxAge, "log_rotate_max_age", 30, "accepted for Istio compatibility; ignored")
	pf.IntVar(&g.logRotateMaxSize, "log_rotate_max_size", 104857600, "accepted for Istio compatibility; ignored")
	pf.IntVar(&g.logRotateMaxBackups, "log_rotate_max_backups", 1000, "accepted for Istio compatibility; ignored")

	root.AddCommand(
		newVersionCmd(),
		newIptablesCmd(g),
		newWaitCmd(g),
		newProxyCmd(g),
		newRequestCmd(),
		newDNSProxyCmd(g),
	)
	tolerateUnknownFlags(root)
	return root
}

// tolerateUnknownFlags applies the root's unknown-flag tolerance to every
// subcommand: cobra does not inherit it.
func tolerateUnknownFlags(cmd *cobra.Command) {
	cmd.FParseErrWhitelist.UnknownFlags = true
	for _, c := range cmd.Commands() {
		tolerateUnknownFlags(c)
	}
}

// unknownFlags lists the flags on the command line that cmd does not define.
// Cobra drops them silently when UnknownFlags is whitelisted; we name them.
func unknownFlags(cmd *cobra.Command, args []string) []string {
	var unknown []string
	flags := cmd.Flags()
	for _, a := range args {
		if a == "--" {
			break
		}
		switch {
		case strings.HasPrefix(a, "--"):
			name, _, _ := strings.Cut(a[2:], "=")
			if name != "" && flags.Lookup(name) == nil {
				unknown = append(unknown, "--"+name)
			}
		case strings.HasPrefix(a, "-") && len(a) > 1:
			if !knownShorthands(flags, a[1:]) {
				unknown = append(unknown, a)
			}
		}
	}
	return unknown
}

// knownShorthands reports whether the shorthand cluster s (e.g. "p" or "p15001"
// or "nq") starts with a defined shorthand flag.
func knownShorthands(flags *pflag.FlagSet, s string) bool {
	return flags.ShorthandLookup(s[:1]) != nil
}
