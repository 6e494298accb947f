// Package netstate captures a network namespace's capture state as text, so
// tests and the demo can prove that init mode leaves a namespace exactly as
// it found it: both iptables backends' rules for both families, the policy
// routing rules, every route table and loopback's addresses.
package netstate

import "strings"

// Runner runs a command inside the namespace and returns its stdout.
type Runner func(name string, args ...string) (string, error)

// Snapshot is everything an istio-iptables run may touch, as text. A tool
// that fails (IPv6 disabled, a backend missing) contributes its error, so a
// change in that is seen too.
func Snapshot(run Runner) string {
	var b strings.Builder
	for _, tool := range []string{"iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"} {
		out, err := run(tool)
		if err != nil {
			out = "error: " + err.Error()
		}
		b.WriteString("== " + tool + "\n" + Effective(out))
	}
	for _, c := range [][]string{{"ip", "-4", "rule"}, {"ip", "-6", "rule"}, {"ip", "-4", "route", "show", "table", "all"},
		{"ip", "-6", "route", "show", "table", "all"}, {"ip", "addr", "show", "dev", "lo"}} {
		out, _ := run(c[0], c[1:]...)
		b.WriteString("== " + strings.Join(c, " ") + "\n" + out)
	}
	return b.String()
}

// Effective is iptables-save output without comments and counters, and
// without tables that hold nothing: no rule, no user chain, every built-in
// chain ACCEPT. Such a table filters nothing, and neither backend can
// remove one once it exists (legacy keeps the table, iptables-nft its base
// chains).
func Effective(save string) string {
	var b strings.Builder
	var table []string
	keep := false
	for _, l := range strings.Split(save, "\n") {
		switch {
		case l == "" || strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "*"):
			table, keep = []string{l}, false
		case l == "COMMIT":
			if keep {
				b.WriteString(strings.Join(append(table, l), "\n") + "\n")
			}
		case strings.HasPrefix(l, ":"):
			f := strings.Fields(l)
			if len(f) < 2 {
				table, keep = append(table, l), true
				continue
			}
			table = append(table, f[0]+" "+f[1])
			if !builtin[strings.TrimPrefix(f[0], ":")] || f[1] != "ACCEPT" {
				keep = true
			}
		default:
			table, keep = append(table, l), true
		}
	}
	return b.String()
}

var builtin = map[string]bool{"PREROUTING": true, "INPUT": true, "FORWARD": true, "OUTPUT": true, "POSTROUTING": true}
