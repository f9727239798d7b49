// Command kelpie-agent is the Kelpie guest agent. It runs inside the VM
// (started and respawned by busybox init, see guest/image/rootfs/etc/inittab)
// and serves the agent protocol on the virtio-serial port named
// org.kelpie.agent (QEMU) and on AF_VSOCK port 1024 (agent.VsockPort) of
// any CID, for VMs with a vsock device (Firecracker, Apple VZ). Each vsock
// connection is its own protocol session; several may be served at once,
// alongside the serial port. If the kernel refuses the vsock listener (no
// AF_VSOCK), the agent logs that once and serves virtio-serial alone. With
// the vsock modules loaded but no device, listening succeeds and the
// listener stays idle; the startup log says which case applies.
//
// The port reads EOF while no host is connected (before the host connects,
// between connections, and right after the VM was restored from a snapshot
// into a new QEMU process). The agent never exits on that: it drops any
// partial input, backs off briefly and keeps reading. Other errors make it
// reopen the port.
//
// `kelpie-agent -now` prints the guest wall clock to the nanosecond, for
// users and tests inside the guest.
//
// Build: CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' ./guest/agent/cmd/kelpie-agent
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kelpie/teleport/guest/agent"
)

func main() {
	port := flag.String("port", "", "device to serve on (default: find the virtio-serial port by -name)")
	name := flag.String("name", agent.PortName, "virtio-serial port name to look for")
	workdir := flag.String("workdir", "", "default exec working directory")
	vsockPort := flag.Uint("vsock-port", uint(agent.VsockPort), "AF_VSOCK port to serve on as well (0 = none)")
	version := flag.Bool("version", false, "print version and exit")
	now := flag.Bool("now", false, "print the wall clock as SECONDS.NANOSECONDS since the Unix epoch and exit (busybox date has no sub-second output)")
	flag.Parse()
	if *version {
		fmt.Println(agent.Version)
		return
	}
	if *now {
		t := time.Now()
		fmt.Printf("%d.%09d\n", t.Unix(), t.Nanosecond())
		return
	}
	log.SetFlags(0)
	log.SetPrefix("kelpie-agent: ")
	// busybox init gives PATH=/sbin:/usr/sbin:/bin:/usr/bin and HOME=/;
	// exec'd commands get a conventional environment instead.
	os.Setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	if h := os.Getenv("HOME"); h == "" || h == "/" {
		os.Setenv("HOME", "/root")
	}

	srv := agent.NewServer(agent.ServerConfig{
		DefaultWorkdir: *workdir,
		Logf:           log.Printf,
	})
	ctx := context.Background()
	log.Printf("version %s starting", agent.Version)

	if *vsockPort > 0 && *vsockPort < math.MaxUint32 {
		p := uint32(*vsockPort)
		log.Print(vsockStatus())
		go serveListener(ctx, srv, "vsock", func() (net.Listener, error) { return listenVsock(p) }, log.Printf)
	} else if *vsockPort != 0 {
		log.Printf("-vsock-port %d out of range; not serving on vsock", *vsockPort)
	}

	for attempt := 0; ; attempt++ {
		path := *port
		if path == "" {
			path = findPort(*name)
		}
		if path == "" {
			if attempt == 20 {
				log.Printf("still waiting for virtio-serial port %q", *name)
			}
			time.Sleep(backoff(attempt, 20*time.Millisecond, 500*time.Millisecond))
			continue
		}
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			log.Printf("open %s: %v", path, err)
			time.Sleep(backoff(attempt, 50*time.Millisecond, time.Second))
			continue
		}
		log.Printf("serving on %s", path)
		attempt = 0
		serve(ctx, srv, f)
		f.Close()
	}
}

// serve runs connections on f until a non-EOF error.
func serve(ctx context.Context, srv *agent.Server, f *os.File) {
	eofs := 0
	for {
		start := time.Now()
		err := srv.ServeConn(ctx, f)
		if errors.Is(err, io.EOF) {
			// No host connected. A new ServeConn starts with a fresh
			// frame reader, discarding any partial frame.
			if time.Since(start) > time.Second {
				eofs = 0
			}
			time.Sleep(backoff(eofs, 5*time.Millisecond, 100*time.Millisecond))
			eofs++
			continue
		}
		log.Printf("read %s: %v; reopening", f.Name(), err)
		time.Sleep(100 * time.Millisecond)
		return
	}
}

// Pauses before listening again after a listener failed.
const (
	relistenBackoffMin = 100 * time.Millisecond
	relistenBackoffMax = 5 * time.Second
	// A listener that served this long resets the backoff.
	relistenHealthy = 10 * time.Second
)

// serveListener serves srv on a listener from listen (what names it in
// logs) until ctx ends, alongside the virtio-serial port. If the first
// listen fails (for vsock: the kernel has no AF_VSOCK or no vsock
// transport), it logs that once and returns the error; the caller carries
// on without it. A listener that worked and then failed is replaced, with
// backoff, logging the first failure of a streak.
func serveListener(ctx context.Context, srv *agent.Server, what string, listen func() (net.Listener, error), logf func(string, ...any)) error {
	ln, err := listen()
	if err != nil {
		logf("not serving on %s: %v", what, err)
		return err
	}
	failures := 0
	for {
		logf("serving on %s", ln.Addr())
		start := time.Now()
		err := srv.Serve(ctx, ln)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Since(start) > relistenHealthy {
			failures = 0
		}
		if failures == 0 {
			logf("%s: %v; listening again", what, err)
		}
		for {
			t := time.NewTimer(backoff(failures, relistenBackoffMin, relistenBackoffMax))
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
			failures++
			if ln, err = listen(); err == nil {
				break
			}
			if failures == 1 {
				logf("%s: listen: %v; retrying", what, err)
			}
		}
	}
}

func backoff(attempt int, min, max time.Duration) time.Duration {
	d := min
	for i := 0; i < attempt && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	return d
}

// findPort returns /dev/<port> for the virtio port called name, or "".
func findPort(name string) string {
	matches, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err != nil || strings.TrimSpace(string(b)) != name {
			continue
		}
		dev := "/dev/" + filepath.Base(filepath.Dir(m))
		if _, err := os.Stat(dev); err == nil {
			return dev
		}
	}
	return ""
}
