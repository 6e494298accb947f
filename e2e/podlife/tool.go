package podlife

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// ToolMain runs one helper mode in a namespace and returns the exit code;
// the demo binary dispatches to it when its first argument is a mode:
//
//	serve ADDR   a TCP service that greets each client with its address
//	dial ADDR    connect and close
//	call HOST:PORT  resolve with the Go resolver, connect, print the reply
//	get URL / post URL  print the HTTP status code
//	body URL     print the body of a GET
//	dns ADDR     the cluster's DNS server: NXDOMAIN (with SOA) for every name
//	probeload URL SECONDS CLIENTS  kubelet-style GETs (new connection each,
//	             3s timeout) from CLIENTS loops; prints the latency summary
func ToolMain(mode string, args []string) (int, bool) {
	fn, ok := map[string]func([]string) error{
		"serve": serve, "dial": dial, "call": call,
		"get":  func(a []string) error { return httpStatus(http.MethodGet, a) },
		"post": func(a []string) error { return httpStatus(http.MethodPost, a) },
		"body": body, "dns": dnsServe, "probeload": probeLoad,
	}[mode]
	if !ok {
		return 0, false
	}
	if len(args) != 1 && !(mode == "probeload" && len(args) == 3) {
		fmt.Fprintf(os.Stderr, "%s: want one argument\n", mode)
		return 2, true
	}
	if err := fn(args); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", mode, err)
		return 1, true
	}
	return 0, true
}

func serve(args []string) error {
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			fmt.Fprintf(c, "hello from %s, you are %s\n", c.LocalAddr(), c.RemoteAddr())
		}()
	}
}

func dnsServe(args []string) error {
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetRcode(req, dns.RcodeNameError)
		m.Ns = []dns.RR{&dns.SOA{
			Hdr: dns.RR_Header{Name: "cluster.local.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 30},
			Ns:  "ns.dns.cluster.local.", Mbox: "hostmaster.cluster.local.", Serial: 1,
			Refresh: 7200, Retry: 1800, Expire: 86400, Minttl: 30,
		}}
		_ = w.WriteMsg(m)
	})
	errs := make(chan error, 2)
	for _, network := range []string{"udp", "tcp"} {
		srv := &dns.Server{Addr: args[0], Net: network, Handler: handler}
		go func() { errs <- srv.ListenAndServe() }()
	}
	return <-errs
}

func dial(args []string) error {
	c, err := net.DialTimeout("tcp", args[0], 2*time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}

func call(args []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// The pure-Go resolver reads the pod's resolv.conf; its port-53
	// queries are captured to the agent like any app's.
	r := &net.Resolver{PreferGo: true}
	d := net.Dialer{Resolver: r}
	c, err := d.DialContext(ctx, "tcp4", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read reply: %w", err)
	}
	fmt.Print(line)
	return nil
}

func httpStatus(method string, args []string) error {
	req, err := http.NewRequest(method, args[0], nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Timeout: 3 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	fmt.Println(resp.StatusCode)
	return nil
}

func body(args []string) error {
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(args[0])
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	b, err := io.ReadAll(resp.Body)
	fmt.Print(strings.TrimRight(string(b), "\n") + "\n")
	return err
}

func probeLoad(args []string) error {
	seconds, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	clients, err := strconv.Atoi(args[2])
	if err != nil {
		return err
	}
	end := time.Now().Add(time.Duration(seconds) * time.Second)
	var mu sync.Mutex
	var lat []time.Duration
	failures := 0
	var wg sync.WaitGroup
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// kubelet opens a new connection per probe; the injection
			// template's readiness timeout is 3s.
			c := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
			for time.Now().Before(end) {
				start := time.Now()
				resp, err := c.Get(args[0])
				d := time.Since(start)
				ok := err == nil && resp.StatusCode == http.StatusOK
				if resp != nil {
					resp.Body.Close()
				}
				mu.Lock()
				lat = append(lat, d)
				if !ok {
					failures++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	slices.Sort(lat)
	q := func(f float64) time.Duration { return lat[int(f*float64(len(lat)-1))] }
	fmt.Printf("probes=%d rps=%.0f p50_ms=%.2f p99_ms=%.2f max_ms=%.2f failures=%d\n", len(lat),
		float64(len(lat))/float64(seconds), ms(q(0.5)), ms(q(0.99)), ms(lat[len(lat)-1]), failures)
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
