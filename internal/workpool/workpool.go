// Package workpool runs n jobs on a few goroutines: the one pool the blob
// codec and the chunk space use to read and verify chunks in parallel. It
// must never start more goroutines than asked, nor leave one running when
// Run returns.
package workpool

import (
	"context"
	"sync"
)

// Run calls fn(w, i) for i in 0..n-1 on up to workers goroutines, w being
// the calling worker's index (0..workers-1, so callers can keep a buffer
// per worker), and returns the first error, after which no new job
// starts. workers <= 1 runs every job in order on the caller's goroutine:
// what deterministic callers (the simulation) need.
func Run(ctx context.Context, workers, n int, fn func(w, i int) error) error {
	if workers <= 1 || n <= 1 {
		for i := 0; i < n; i++ {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := fn(0, i); err != nil {
				return err
			}
		}
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := make(chan int)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	for w := 0; w < min(workers, n); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := fn(w, i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					cancel()
				}
			}
		}()
	}
send:
	for i := 0; i < n; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
			break send
		}
	}
	close(next)
	wg.Wait()
	if first != nil {
		return first
	}
	return ctx.Err()
}
