// Command kelpie-agent is the Kelpie guest agent. It runs inside the VM
// (started and respawned by busybox init, see guest/image/rootfs/etc/inittab)
// and serves the agent protocol on the virtio-serial port named
// org.kelpie.agent.
//
// The port reads EOF while no host is connected (before the host connects,
// between connections, and right after the VM was restored from a snapshot
// into a new QEMU process). The agent never exits on that: it drops any
// partial input, backs off briefly and keeps reading. Other errors make it
// reopen the port.
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
	version := flag.Bool("version", false, "print version and exit")
	flag.Parse()
	if *version {
		fmt.Println(agent.Version)
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
