package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
)

// PodInfo is what the downward API volume tells the agent about its pod.
type PodInfo struct {
	// Labels from ./etc/istio/pod/labels; nil when the file is absent.
	Labels map[string]string
	// Annotations from ./etc/istio/pod/annotations; nil when absent.
	Annotations map[string]string
}

// ReadPodInfo reads the downward API files under root. A missing file is not
// an error (the agent also runs outside Kubernetes); a malformed one is.
func ReadPodInfo(root string) (PodInfo, error) {
	var pi PodInfo
	var err error
	if pi.Labels, err = readDownwardFile(Rooted(root, PodLabelsPath)); err != nil {
		return pi, err
	}
	if pi.Annotations, err = readDownwardFile(Rooted(root, PodAnnotationsPath)); err != nil {
		return pi, err
	}
	return pi, nil
}

func readDownwardFile(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read pod info: %w", err)
	}
	m, err := ParseDownwardAPI(string(b))
	if err != nil {
		return nil, fmt.Errorf("pod info file %s: %w", path, err)
	}
	return m, nil
}

// ParseDownwardAPI parses the Kubernetes downward API map format: one
// `key="value"` per line, the value Go-quoted (so newlines inside a value are
// written as \n and stay on one line). Blank lines are skipped.
func ParseDownwardAPI(s string) (map[string]string, error) {
	m := map[string]string{}
	for i, line := range strings.Split(s, "\n") {
		line = strings.TrimSuffix(line, "\r")
		if strings.TrimSpace(line) == "" {
			continue
		}
		key, quoted, ok := strings.Cut(line, "=")
		if !ok || key == "" {
			return nil, fmt.Errorf("line %d: want key=\"value\", got %q", i+1, shorten(line))
		}
		prefix, err := strconv.QuotedPrefix(quoted)
		if err != nil || len(prefix) != len(quoted) {
			return nil, fmt.Errorf("line %d: value of %q is not a quoted string: %q", i+1, key, shorten(quoted))
		}
		v, err := strconv.Unquote(prefix)
		if err != nil {
			return nil, fmt.Errorf("line %d: value of %q: %v", i+1, key, err)
		}
		m[key] = v
	}
	return m, nil
}

func shorten(s string) string {
	if len(s) > 80 {
		return s[:77] + "..."
	}
	return s
}
