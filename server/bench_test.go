package server_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kelpie/teleport/server"
)

// loadgen sends n GETs of path from `clients` concurrent keep-alive
// clients and returns requests/s and the 50th and 99th percentile
// latencies: the load generator runs on this machine, beside the daemon.
func loadgen(tb testing.TB, url, path, token string, clients, n int) (rps float64, p50, p99 time.Duration) {
	tr := &http.Transport{MaxIdleConnsPerHost: clients, MaxConnsPerHost: clients}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	lat := make([]time.Duration, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var fail atomic.Value
	start := time.Now()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				req, _ := http.NewRequest("GET", url+path, nil)
				req.Header.Set("Authorization", "Bearer "+token)
				t := time.Now()
				resp, err := hc.Do(req)
				if err != nil {
					fail.Store(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				lat[i] = time.Since(t)
				if resp.StatusCode != 200 {
					fail.Store(fmt.Errorf("%s answered %d", path, resp.StatusCode))
					return
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	if err, ok := fail.Load().(error); ok {
		tb.Fatal(err)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return float64(n) / el.Seconds(), lat[n/2], lat[n*99/100]
}

// BenchmarkAgentShow: GET /v1/agents/{name} (a linearizable registry read
// per request) with 64 concurrent clients, against a same-run baseline of
// GET /healthz (the HTTP stack alone) under the same load. The issue asks
// for at least 2,000 requests/s with p99 at most 20 ms.
func BenchmarkAgentShow(b *testing.B) {
	f := newTestFleet(b, "bench-token")
	d := f.daemon("host-a")
	if _, err := d.c.CreateAgent(context.Background(), server.CreateRequest{Name: "ag", Backend: "sim"}); err != nil {
		b.Fatal(err)
	}
	const clients = 64
	n := max(b.N, 2000)
	for _, c := range []struct{ name, path string }{{"healthz", "/healthz"}, {"agent-show", "/v1/agents/ag"}} {
		loadgen(b, d.url, c.path, "bench-token", clients, 500) // warm the connections
		rps, p50, p99 := loadgen(b, d.url, c.path, "bench-token", clients, n)
		b.ReportMetric(rps, c.name+"-req/s")
		b.ReportMetric(float64(p99.Microseconds())/1000, c.name+"-p99-ms")
		b.ReportMetric(float64(p50.Microseconds())/1000, c.name+"-p50-ms")
	}
}
