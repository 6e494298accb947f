package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// demo holds the namespaces and state the steps share.
type demo struct {
	outrigger, self string
	id              string
	made            []string
	initialState    string
	appliedState    string
}

func (d *demo) ns(role string) string { return "outrigger-demo-" + role + "-" + d.id }

func (d *demo) makeNamespaces(ctx context.Context) error {
	pod, peer := d.ns("pod"), d.ns("peer")
	for _, ns := range []string{pod, peer} {
		if _, err := runCmd(ctx, "ip", "netns", "add", ns); err != nil {
			return err
		}
		d.made = append(d.made, ns)
	}
	veth := "ordemo" + d.id
	cmds := [][]string{
		{"ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"},
		{"ip", "link", "set", veth, "netns", pod},
		{"ip", "link", "set", veth + "p", "netns", peer},
		{"ip", "-n", pod, "link", "set", veth, "name", "eth0"},
		{"ip", "-n", peer, "link", "set", veth + "p", "name", "eth0"},
		{"ip", "-n", pod, "addr", "add", podIP + "/24", "dev", "eth0"},
		{"ip", "-n", peer, "addr", "add", peerIP + "/24", "dev", "eth0"},
		{"ip", "-n", pod, "link", "set", "eth0", "up"},
		{"ip", "-n", peer, "link", "set", "eth0", "up"},
		{"ip", "-n", pod, "link", "set", "lo", "up"},
		{"ip", "-n", peer, "link", "set", "lo", "up"},
		{"ip", "-n", pod, "route", "add", "default", "via", peerIP},
	}
	for _, c := range cmds {
		if _, err := runCmd(ctx, c[0], c[1:]...); err != nil {
			return err
		}
	}
	return nil
}

// cleanup removes every namespace the demo made (their rules go with them).
func (d *demo) cleanup() {
	for _, ns := range d.made {
		_, _ = runCmd(context.Background(), "ip", "netns", "del", ns)
	}
}

func (d *demo) inPod(ctx context.Context, name string, args ...string) (string, error) {
	return runCmd(ctx, "ip", append([]string{"netns", "exec", d.ns("pod"), name}, args...)...)
}

func (d *demo) inPeer(ctx context.Context, name string, args ...string) (string, error) {
	return runCmd(ctx, "ip", append([]string{"netns", "exec", d.ns("peer"), name}, args...)...)
}

// iptablesState is the pod's rules on both backends, without counters and
// comments, for before/after comparisons. A table holding nothing but empty
// built-in chains with policy ACCEPT filters nothing; iptables-nft cannot
// remove one once it exists, so such tables are left out.
func (d *demo) iptablesState(ctx context.Context) (string, error) {
	var b strings.Builder
	for _, save := range []string{"iptables-legacy-save", "iptables-nft-save"} {
		if _, err := exec.LookPath(save); err != nil {
			continue
		}
		out, err := d.inPod(ctx, save)
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

// captureOnce starts a listener on port in the pod, runs trigger, and returns
// the original destination the listener saw.
func (d *demo) captureOnce(ctx context.Context, port string, trigger func() error) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", d.ns("pod"), d.self, "listen", "0.0.0.0:"+port)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return "", err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return "", err
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || lines.Text() != "listening" {
		return "", fmt.Errorf("listener on %s did not start", port)
	}
	if err := trigger(); err != nil {
		return "", fmt.Errorf("connection: %w", err)
	}
	if !lines.Scan() {
		return "", fmt.Errorf("listener on %s accepted nothing", port)
	}
	return strings.TrimPrefix(lines.Text(), "origdst "), nil
}

// listenMode accepts one connection and prints its SO_ORIGINAL_DST.
func listenMode(args []string) int {
	ln, err := net.Listen("tcp4", args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("listening")
	c, err := ln.Accept()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	orig, err := originalDst(c.(*net.TCPConn))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("origdst " + orig.String())
	return 0
}

func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var mreq *unix.IPv6Mreq
	var serr error
	if err := raw.Control(func(fd uintptr) {
		mreq, serr = unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST)
	}); err != nil {
		return netip.AddrPort{}, err
	}
	if serr != nil {
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST: %w", serr)
	}
	b := mreq.Multiaddr
	port := binary.BigEndian.Uint16(b[2:4])
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{b[4], b[5], b[6], b[7]}), port), nil
}

// dialMode connects to addr and closes.
func dialMode(args []string) int {
	c, err := net.DialTimeout("tcp", args[0], 3*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	c.Close()
	return 0
}

func runCmd(ctx context.Context, name string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}
