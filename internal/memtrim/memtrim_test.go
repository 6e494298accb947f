package memtrim

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

func rssFileKB(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "RssFile:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Skip("kernel reports no RssFile")
	return 0
}

func TestTrimReleasesExecutablePages(t *testing.T) {
	before := rssFileKB(t)
	n, err := Trim()
	if err != nil {
		t.Fatalf("Trim: %v", err)
	}
	if n == 0 {
		t.Skip("kernel without MADV_PAGEOUT (before 5.4)")
	}
	after := rssFileKB(t)
	// The test binary's code and constants were resident (the test ran
	// them); after Trim most of them are not.
	if after >= before {
		t.Errorf("RssFile %d kB before Trim, %d kB after: nothing released", before, after)
	}
	t.Logf("advised %d bytes; RssFile %d kB → %d kB", n, before, after)
}
