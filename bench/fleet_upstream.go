// fleet_upstream.go - one origin process for `make bench-fleet`, listening on many loopback addresses.
//
// A fleet of sandboxes is thousands of distinct upstream addresses; the gateway keeps one pool per
// (scheme, host, port), so what the benchmark needs is many hosts, not many processes. Every address
// in -addrs (one per line) gets a listener on -port, all served by one http.Server:
//
//	POST /mcp     reads the body, answers a ~200-byte JSON-RPC result
//	GET  /health  200 "ok"
//
// The control server on -control (its connections are not counted) answers GET /stats with
// {"opened":N,"open":M,"requests":R} and, with ?by_addr=1, "by_addr": connections opened per
// local address. -idle-timeout closes keep-alive connections idle that long, as uvicorn does after
// 5 s: the stale-connection race needs an upstream that does it.
//
// Standard library only (Go 1.19, Debian's golang-go). Usage:
//
//	fleet_upstream -addrs addrs.txt -port 21710 -control 127.0.0.1:21703 [-idle-timeout 5s]
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

var reply = []byte(`{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok: tool call handled by ` +
	`the fleet benchmark upstream, padding padding padding padding padding"}],"isError":false}}`)

type counters struct {
	opened, open, requests atomic.Int64
	mu                     sync.Mutex
	byAddr                 map[string]int64
}

func (c *counters) connState(conn net.Conn, state http.ConnState) {
	switch state {
	case http.StateNew:
		c.opened.Add(1)
		c.open.Add(1)
		host, _, _ := net.SplitHostPort(conn.LocalAddr().String())
		c.mu.Lock()
		c.byAddr[host]++
		c.mu.Unlock()
	case http.StateClosed, http.StateHijacked:
		c.open.Add(-1)
	}
}

func (c *counters) mcp(w http.ResponseWriter, r *http.Request) {
	c.requests.Add(1)
	_, _ = io.Copy(io.Discard, r.Body)
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(reply)))
	_, _ = w.Write(reply)
}

func (c *counters) stats(w http.ResponseWriter, r *http.Request) {
	out := map[string]any{"opened": c.opened.Load(), "open": c.open.Load(), "requests": c.requests.Load()}
	if r.URL.Query().Get("by_addr") == "1" {
		c.mu.Lock()
		copied := make(map[string]int64, len(c.byAddr))
		for k, v := range c.byAddr {
			copied[k] = v
		}
		c.mu.Unlock()
		out["by_addr"] = copied
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

func readAddrs(path string) []string {
	f, err := os.Open(path)
	if err != nil {
		log.Fatalf("fleet_upstream: %v", err)
	}
	defer f.Close()
	var addrs []string
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		if line := strings.TrimSpace(scanner.Text()); line != "" {
			addrs = append(addrs, line)
		}
	}
	return addrs
}

func main() {
	addrsFile := flag.String("addrs", "", "file with one listen address (host) per line")
	port := flag.Int("port", 21710, "port on every address")
	control := flag.String("control", "127.0.0.1:21703", "address of the /stats server")
	idle := flag.Duration("idle-timeout", 0, "close keep-alive connections idle this long (0: never)")
	flag.Parse()
	c := &counters{byAddr: map[string]int64{}}
	mux := http.NewServeMux()
	mux.HandleFunc("/mcp", c.mcp)
	mux.HandleFunc("/health", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	// No ReadHeaderTimeout: with IdleTimeout 0, Go applies it to the wait for the next request too,
	// which would close idle keep-alive connections after that long and hide what the proxy does.
	srv := &http.Server{Handler: mux, IdleTimeout: *idle, ConnState: c.connState}
	// Listen on every address before serving any: a bind failure stops the start, not half a fleet.
	addrs := readAddrs(*addrsFile)
	listeners := make([]net.Listener, 0, len(addrs))
	for _, host := range addrs {
		l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(*port)))
		if err != nil {
			log.Fatalf("fleet_upstream: %v", err)
		}
		listeners = append(listeners, l)
	}
	for _, l := range listeners {
		go func(l net.Listener) { log.Print(srv.Serve(l)) }(l)
	}
	statsMux := http.NewServeMux()
	statsMux.HandleFunc("/stats", c.stats)
	log.Printf("fleet_upstream: %d addresses on port %d, idle timeout %v, stats on %s", len(addrs), *port, *idle, *control)
	log.Fatal(http.ListenAndServe(*control, statsMux))
}
