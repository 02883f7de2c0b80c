package daemon

import (
	"net"
	"sync"
)

// hostLimitListener closes connections beyond max per remote address at
// once (before any TLS work), so that one client cannot take every slot
// of the listener's overall limit (CR 7.1).
type hostLimitListener struct {
	net.Listener
	max int
	mu  sync.Mutex
	n   map[string]int
}

func limitPerHost(l net.Listener, max int) net.Listener {
	return &hostLimitListener{Listener: l, max: max, n: map[string]int{}}
}

func (l *hostLimitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		host := c.RemoteAddr().String()
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		l.mu.Lock()
		if l.n[host] >= l.max {
			l.mu.Unlock()
			c.Close()
			continue
		}
		l.n[host]++
		l.mu.Unlock()
		return &hostConn{Conn: c, l: l, host: host}, nil
	}
}

type hostConn struct {
	net.Conn
	l    *hostLimitListener
	host string
	once sync.Once
}

func (c *hostConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		if c.l.n[c.host]--; c.l.n[c.host] <= 0 {
			delete(c.l.n, c.host)
		}
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}
