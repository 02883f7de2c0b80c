// Command nettool is the e2e tests' network probe inside containers (the
// busybox guest OS has no UDP-capable nc): it connects, listens and sends,
// and prints what it received.
//
//	nettool tcp HOST:PORT                 connect, print the first line, exit 1 on failure
//	nettool tcpserve PORT...              answer every connection with "ok-PORT"
//	nettool udpsend HOST:PORT [FROM] [WAIT]  send "ping" from port FROM, print a reply within WAIT seconds
//	nettool udprecv PORT WAIT [reply]     print the first datagram within WAIT seconds, answer "pong"
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: nettool tcp|tcpserve|udpsend|udprecv ...")
		os.Exit(2)
	}
	arg := func(i int, def string) string {
		if len(os.Args) > i {
			return os.Args[i]
		}
		return def
	}
	secs := func(s string) time.Duration { n, _ := strconv.Atoi(s); return time.Duration(n) * time.Second }
	switch os.Args[1] {
	case "tcp":
		c, err := net.DialTimeout("tcp4", os.Args[2], 2*time.Second)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Print(line)
	case "tcpserve":
		for _, p := range os.Args[2:] {
			l, err := net.Listen("tcp4", ":"+p)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			go func(p string) {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					fmt.Fprintf(c, "ok-%s\n", p)
					c.Close()
				}
			}(p)
		}
		select {}
	case "udpsend":
		from, _ := strconv.Atoi(arg(3, "0"))
		raddr, err := net.ResolveUDPAddr("udp4", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		c, err := net.DialUDP("udp4", &net.UDPAddr{Port: from}, raddr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		c.Write([]byte("ping"))
		if w := secs(arg(4, "0")); w > 0 {
			c.SetReadDeadline(time.Now().Add(w))
			b := make([]byte, 64)
			if n, err := c.Read(b); err == nil {
				fmt.Println(string(b[:n]))
			}
		}
	case "udprecv":
		c, err := net.ListenUDP("udp4", &net.UDPAddr{Port: atoi(os.Args[2])})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		c.SetReadDeadline(time.Now().Add(secs(arg(3, "5"))))
		b := make([]byte, 64)
		n, from, err := c.ReadFromUDP(b)
		if err != nil {
			os.Exit(1)
		}
		fmt.Println(string(b[:n]))
		if arg(4, "") == "reply" {
			c.WriteToUDP([]byte("pong"), from)
		}
	default:
		os.Exit(2)
	}
}

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }
