package iptables

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h).
const ip6tSOOriginalDst = 80

// OriginalDst returns the destination a redirected TCP connection was
// sent to before REDIRECT rewrote it (SO_ORIGINAL_DST, or its IPv6 twin).
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	local, _ := netip.ParseAddrPort(c.LocalAddr().String())
	var dst netip.AddrPort
	var serr error
	err = raw.Control(func(fd uintptr) {
		if local.Addr().Unmap().Is4() {
			// struct sockaddr_in fits in the 16 bytes of an ipv6_mreq.
			var m *unix.IPv6Mreq
			if m, serr = unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST); serr == nil {
				b := m.Multiaddr
				dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4]))
			}
			return
		}
		// struct sockaddr_in6 (28 bytes) fits in ip6_mtuinfo (32 bytes).
		var m *unix.IPv6MTUInfo
		if m, serr = unix.GetsockoptIPv6MTUInfo(int(fd), unix.SOL_IPV6, ip6tSOOriginalDst); serr == nil {
			var pb [2]byte // the port is in network order in memory
			binary.NativeEndian.PutUint16(pb[:], m.Addr.Port)
			port := binary.BigEndian.Uint16(pb[:])
			dst = netip.AddrPortFrom(netip.AddrFrom16(m.Addr.Addr), port)
		}
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	if serr != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", serr)
	}
	return dst, nil
}

// validate proves with a real connection that redirection works, as
// Istio's --run-validation does: it listens on the proxy's outbound and
// inbound ports on loopback, connects to the inbound passthrough address
// (127.0.0.6, or ::6) on --iptables-probe-port once a second, and succeeds
// when a connection arrives on a listener whose original destination port
// is the probe port. With Istio's rules this works when run as the proxy's
// uid (the CNI's istio-validation container runs as 1337).
func validate(ctx context.Context, cfg *Config, log *zap.Logger) error {
	listenIP, probeIP := "127.0.0.1", "127.0.0.6"
	if cfg.HostIP.Is6() && !cfg.HostIP.Is4In6() {
		listenIP, probeIP = "::1", "::6"
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); serr == nil {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}
		})
		return errors.Join(err, serr)
	}}
	ctx, cancel := context.WithTimeout(ctx, cfg.ProbeTimeout)
	defer cancel()
	found := make(chan netip.AddrPort, 1)
	var wg sync.WaitGroup
	var listeners []net.Listener
	defer func() {
		for _, ln := range listeners {
			ln.Close()
		}
		wg.Wait()
	}()
	for _, port := range []uint16{cfg.ProxyPort, cfg.InboundCapturePort} {
		addr := net.JoinHostPort(listenIP, fmt.Sprint(port))
		ln, err := lc.Listen(ctx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("%w: listen on %s: %v", ErrValidationFailed, addr, err)
		}
		listeners = append(listeners, ln)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				dst, err := OriginalDst(c.(*net.TCPConn))
				c.Close()
				log.Debug("validation connection", zap.String("listener", addr), zap.Stringer("original_dst", dst), zap.Error(err))
				if err == nil && dst.Port() == cfg.ProbePort {
					select {
					case found <- dst:
					default:
					}
				}
			}
		}()
	}

	target := net.JoinHostPort(probeIP, fmt.Sprint(cfg.ProbePort))
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var lastErr error
	for {
		d := net.Dialer{Timeout: time.Second}
		if c, err := d.DialContext(ctx, "tcp", target); err == nil {
			c.Close()
		} else {
			lastErr = err
		}
		select {
		case dst := <-found:
			log.Info("validation passed: connections are redirected", zap.Stringer("original_dst", dst))
			return nil
		case <-ctx.Done():
			select {
			case dst := <-found:
				log.Info("validation passed: connections are redirected", zap.Stringer("original_dst", dst))
				return nil
			default:
			}
			return fmt.Errorf("%w: no connection to %s reached %s:%d or %s:%d within %s (last dial error: %v); "+
				"check that the iptables rules were applied in this pod (by istio-init or the CNI plugin)",
				ErrValidationFailed, target, listenIP, cfg.ProxyPort, listenIP, cfg.InboundCapturePort, cfg.ProbeTimeout, lastErr)
		case <-tick.C:
		}
	}
}
