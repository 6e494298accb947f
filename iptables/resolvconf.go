package iptables

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"strings"

	"go.uber.org/zap"
)

// ReadNameservers returns the "nameserver" addresses of a resolv.conf, in
// file order and without duplicates: the resolvers whose DNS traffic
// --redirect-dns captures. Zones are dropped (iptables cannot match them)
// and IPv4-mapped IPv6 addresses count as IPv4. Lines that are not valid
// addresses are skipped with a warning, as resolvers skip them.
func ReadNameservers(path string, log *zap.Logger) ([]netip.Addr, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read nameservers: %w", err)
	}
	return parseNameservers(data, path, log), nil
}

func parseNameservers(data []byte, path string, log *zap.Logger) []netip.Addr {
	if log == nil {
		log = zap.NewNop()
	}
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for line := 1; sc.Scan(); line++ {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(fields[1])
		if err != nil {
			log.Warn("ignoring a nameserver that is not an IP address", zap.String("file", path), zap.Int("line", line), zap.String("value", fields[1]))
			continue
		}
		a = a.WithZone("").Unmap()
		if !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	return out
}
