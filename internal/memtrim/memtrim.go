// Package memtrim hands memory the agent touched only while starting back
// to the kernel. The agent lives as long as its pod, and most of its binary
// (Envoy's proto descriptors, the bootstrap validator, flag parsing) is
// needed only in the first second: without this, those pages stay counted
// in the container's resident memory for the pod's life.
package memtrim

import (
	"bufio"
	"fmt"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Trim returns freed heap to the OS and advises the kernel that the
// executable's read-only pages (code and constant data) may be reclaimed.
// They are clean and file-backed: a page the agent needs again is faulted
// back in from the page cache, so this changes nothing but residency. It
// returns the number of bytes advised.
func Trim() (int64, error) {
	debug.FreeOSMemory()
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, fmt.Errorf("memtrim: %w", err)
	}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return 0, fmt.Errorf("memtrim: %w", err)
	}
	defer f.Close()
	var total int64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// address perms offset dev inode path
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || fields[5] != exe || strings.Contains(fields[1], "w") {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			continue
		}
		// MADV_COLD only deactivates the pages; MADV_PAGEOUT reclaims them
		// now. Kernels before 5.4 know neither: that is not an error.
		if _, _, errno := syscall.Syscall(syscall.SYS_MADVISE, uintptr(start), uintptr(end-start), unix.MADV_PAGEOUT); errno != 0 {
			if errno == syscall.EINVAL {
				return total, nil
			}
			return total, fmt.Errorf("memtrim: madvise %s: %w", fields[0], errno)
		}
		total += int64(end - start)
	}
	return total, sc.Err()
}
