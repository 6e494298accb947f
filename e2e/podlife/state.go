package podlife

import (
	"context"
	"os/exec"
	"strings"
)

// iptablesState is the pod's rules on both backends, without counters and
// comments, for before/after comparisons. A table holding nothing but empty
// built-in chains with policy ACCEPT filters nothing; iptables-nft cannot
// remove one once it exists, so such tables are left out.
func (p *Pod) iptablesState(ctx context.Context) (string, error) {
	var b strings.Builder
	for _, save := range []string{"iptables-legacy-save", "iptables-nft-save"} {
		if _, err := exec.LookPath(save); err != nil {
			continue
		}
		out, err := p.InPod(ctx, save)
		if err != nil {
			return "", err
		}
		b.WriteString("## " + save + "\n")
		for _, table := range strings.Split(out, "\n*")[1:] {
			var kept []string
			effective := false
			for _, line := range strings.Split("*"+table, "\n") {
				if strings.HasPrefix(line, "#") || line == "" {
					continue
				}
				if strings.HasPrefix(line, ":") {
					// Chain lines carry packet counters.
					line, _, _ = strings.Cut(line, " [")
					name, policy, _ := strings.Cut(line[1:], " ")
					if policy != "ACCEPT" || !builtinChain(name) {
						effective = true
					}
				}
				if strings.HasPrefix(line, "-A ") {
					effective = true
				}
				kept = append(kept, line)
			}
			if effective {
				b.WriteString(strings.Join(kept, "\n") + "\n")
			}
		}
	}
	return b.String(), nil
}

func builtinChain(name string) bool {
	switch name {
	case "PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING":
		return true
	}
	return false
}
