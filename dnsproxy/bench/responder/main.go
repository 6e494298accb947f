// Command responder is the do-nothing DNS server the DNS proxy benchmark
// compares against: a plain miekg/dns server that answers every question
// with one A record (TTL 1 h). It also serves as the proxy's upstream when
// the benchmark measures cached answers.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/miekg/dns"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "UDP address to answer on")
	flag.Parse()
	pc, err := net.ListenPacket("udp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "responder:", err)
		os.Exit(1)
	}
	fmt.Println(pc.LocalAddr().String()) // the benchmark reads the port
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		if len(r.Question) == 1 && r.Question[0].Qtype == dns.TypeA {
			m.Answer = []dns.RR{&dns.A{
				Hdr: dns.RR_Header{Name: r.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 3600},
				A:   net.IPv4(192, 0, 2, 1),
			}}
		}
		_ = w.WriteMsg(m)
	})}
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		_ = srv.Shutdown()
	}()
	if err := srv.ActivateAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, "responder:", err)
		os.Exit(1)
	}
}
