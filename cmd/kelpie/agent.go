package main

import (
	"context"
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/kelpie/teleport/registry"
	"github.com/kelpie/teleport/server"
)

func init() {
	register(command{"agent", "agents through a daemon: create, exec, move, rm, ls, show (registry-wide)", cmdAgent})
	register(command{"host", "the fleet's hosts, from the registry (host ls)", cmdHost})
}

const agentUsage = `kelpie --server URL agent create NAME [--memory MIB] [--cpus N] [--network M] [--publish P]... [--forward F]... [--disk SIZE]
       kelpie --server URL agent exec NAME [--timeout DURATION] [--workdir DIR] -- CMD [ARG...]
       kelpie --server URL agent move NAME --to HOST_ID [--store STORE]   # prints the new owner
       kelpie --server URL agent claim NAME [--package ID]                # restore an in-flight agent there
       kelpie --server URL agent pause|resume|stop|rm NAME
       kelpie --server URL agent ls [--json]
       kelpie --server URL agent show NAME [--json]
       (ls and show also work with --registry URL instead of --server)`

// tokenFor is the bearer token for the daemon: KELPIE_TOKEN, or the file
// KELPIE_TOKEN_FILE names.
func tokenFor(e *env) (string, error) {
	if t := e.getenv("KELPIE_TOKEN"); t != "" {
		return t, nil
	}
	if f := e.getenv("KELPIE_TOKEN_FILE"); f != "" {
		return server.ReadToken(f)
	}
	return "", nil
}

// client is the daemon client of --server.
func (e *env) client() (*server.Client, error) {
	if e.server == "" {
		return nil, usagef("this command goes through a daemon: give --server URL (or set KELPIE_SERVER)")
	}
	token, err := tokenFor(e)
	if err != nil {
		return nil, err
	}
	return server.NewClientTLS(e.server, server.ClientOptions{Token: token, CAFile: e.getenv("KELPIE_CA")})
}

func cmdAgent(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("usage: %s", agentUsage)
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "create":
		fs := newFlags(e, "agent create")
		mem := fs.Int("memory", 0, "guest memory in MiB (default 256)")
		cpus := fs.Int("cpus", 0, "vCPUs (default 1)")
		backend := fs.String("backend", "", "VM backend (default the daemon's)")
		network := fs.String("network", "", "none, restricted (the default: no egress but the --forward ports) or full")
		var nf netFlags
		addPublishFlag(fs, &nf, "")
		addForwardFlag(fs, &nf)
		disk := fs.String("disk", "", "a workspace disk of this size (ext4 at /workspace), like 1G")
		pos, err := parse(fs, args)
		if err != nil {
			return err
		}
		if len(pos) != 1 {
			return usagef("usage: kelpie --server URL agent create NAME [--memory MIB] [--cpus N] [--network M] [--publish P]... [--forward F]... [--disk SIZE]")
		}
		return agentCreateRemote(ctx, e, server.CreateRequest{Name: pos[0], MemoryMiB: *mem, VCPUs: *cpus, Backend: *backend}, *network, &nf, *disk)
	case "exec":
		fs := newFlags(e, "agent exec")
		timeout := fs.Duration("timeout", 0, "kill the guest command after this long (0: no limit)")
		workdir := fs.String("workdir", "", "guest working directory (default /workspace)")
		pos, err := parse(fs, args)
		if err != nil {
			return err
		}
		if len(pos) < 2 {
			return usagef("usage: kelpie --server URL agent exec NAME -- CMD [ARG...]")
		}
		return agentExecRemote(ctx, e, pos[0], pos[1], pos[2:], *timeout, *workdir)
	case "move":
		return agentMove(ctx, e, args)
	case "claim":
		fs := newFlags(e, "agent claim")
		pkg := fs.String("package", "", "the package it must be in flight in (default: its current one)")
		pos, err := parse(fs, args)
		if err != nil {
			return err
		}
		if len(pos) != 1 {
			return usagef("usage: kelpie --server URL agent claim NAME [--package ID]")
		}
		c, err := e.client()
		if err != nil {
			return err
		}
		a, err := c.Claim(ctx, pos[0], *pkg)
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stderr, "kelpie: agent %s claimed: runs on %s (epoch %d)\n", a.Name, a.Owner, a.Epoch)
		fmt.Fprintln(e.stdout, a.Owner)
		return nil
	case "pause", "resume", "stop", "rm":
		fs := newFlags(e, "agent "+sub)
		pos, err := parse(fs, args)
		if err != nil {
			return err
		}
		if len(pos) != 1 {
			return usagef("usage: kelpie --server URL agent %s NAME", sub)
		}
		return agentActRemote(ctx, e, sub, pos[0])
	case "ls", "list":
		fs := newFlags(e, "agent ls")
		asJSON := fs.Bool("json", false, "print JSON")
		regFlag := fs.String("registry", "", registryFlagHelp)
		pos, err := parse(fs, args)
		if err != nil {
			return err
		}
		if len(pos) != 0 {
			return usagef("usage: kelpie --server URL agent ls [--json]")
		}
		var agents []registry.Agent
		err = readRegistry(ctx, e, *regFlag, func(c *server.Client) (err error) {
			agents, err = c.Agents(ctx)
			return err
		}, func(r registry.Registry) (err error) {
			agents, err = r.Agents(ctx)
			return err
		})
		if err != nil {
			return err
		}
		if agents == nil {
			agents = []registry.Agent{}
		}
		if *asJSON {
			return json.NewEncoder(e.stdout).Encode(agents)
		}
		tw := tabwriter.NewWriter(e.stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tOWNER\tSTATE\tEPOCH\tPACKAGE\tSINCE")
		for _, a := range agents {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", a.Name, orDash(a.Owner), a.State, a.Epoch, orDash(a.Package), a.Since.Format(time.RFC3339))
		}
		return tw.Flush()
	case "show":
		fs := newFlags(e, "agent show")
		asJSON := fs.Bool("json", false, "print JSON")
		regFlag := fs.String("registry", "", registryFlagHelp)
		pos, err := parse(fs, args)
		if err != nil {
			return err
		}
		if len(pos) != 1 {
			return usagef("usage: kelpie --server URL agent show NAME [--json]")
		}
		var a *registry.Agent
		err = readRegistry(ctx, e, *regFlag, func(c *server.Client) (err error) {
			a, err = c.Agent(ctx, pos[0])
			return err
		}, func(r registry.Registry) (err error) {
			a, err = r.Agent(ctx, pos[0])
			return err
		})
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(e.stdout).Encode(a)
		}
		fmt.Fprintf(e.stdout, "agent %s %s\n", a.Name, a.Where())
		return nil
	}
	return usagef("unknown agent command %q; usage: %s", sub, agentUsage)
}

// readRegistry answers a registry-wide question through the daemon, or
// straight from the registry when there is no --server but a registry.
func readRegistry(ctx context.Context, e *env, regFlag string, viaServer func(*server.Client) error, direct func(registry.Registry) error) error {
	if e.server != "" {
		c, err := e.client()
		if err != nil {
			return err
		}
		return viaServer(c)
	}
	u, err := registryURL(e, regFlag)
	if err != nil {
		return err
	}
	if u == "" {
		return usagef("give --server URL (a daemon) or --registry URL (or set KELPIE_SERVER / KELPIE_REGISTRY)")
	}
	r, err := registry.Open(u, registry.Options{})
	if err != nil {
		return err
	}
	defer r.Close()
	return direct(r)
}

// agentCreateRemote creates an agent through the daemon, with the
// sandbox flags (network "" for the daemon's default, disk "" for none).
func agentCreateRemote(ctx context.Context, e *env, req server.CreateRequest, network string, nf *netFlags, disk string) error {
	if _, err := checkNetworkFlag(network); err != nil {
		return err
	}
	req.Network, req.Publish, req.Forwards = network, nf.publish.vals, nf.forwards.vals
	if disk != "" {
		var err error
		if req.DiskBytes, err = parseSize(disk); err != nil {
			return err
		}
	}
	c, err := e.client()
	if err != nil {
		return err
	}
	start := time.Now()
	a, err := c.CreateAgent(ctx, req)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stderr, "kelpie: agent %s running on %s (epoch %d, ready in %.2f s)\n", a.Name, a.Owner, a.Epoch, time.Since(start).Seconds())
	fmt.Fprintln(e.stdout, a.Name)
	return nil
}

func agentExecRemote(ctx context.Context, e *env, name, cmd string, args []string, timeout time.Duration, workdir string) error {
	c, err := e.client()
	if err != nil {
		return err
	}
	res, err := c.Exec(ctx, name, server.ExecRequest{Cmd: cmd, Args: args, TimeoutMs: timeout.Milliseconds(), Workdir: workdir})
	if err != nil {
		return err
	}
	return printExec(e, res.Stdout, res.Stderr, res.Truncated, res.TimedOut, timeout, res.ExitCode)
}

func agentActRemote(ctx context.Context, e *env, action, name string) error {
	c, err := e.client()
	if err != nil {
		return err
	}
	if action == "rm" {
		if err := c.RemoveAgent(ctx, name); err != nil {
			return err
		}
		fmt.Fprintf(e.stderr, "kelpie: agent %s removed\n", name)
		return nil
	}
	if action == "start" {
		return usagef("vm start does not go through a daemon: a stopped agent's memory is gone; rm it and create it again")
	}
	a, err := c.Act(ctx, name, action)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stderr, "kelpie: agent %s: %s done; %s\n", name, action, a.Where())
	return nil
}

func agentMove(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "agent move")
	to := fs.String("to", "", "the target host id (kelpie host ls)")
	store := fs.String("store", "", "package store both daemons serve (default the source daemon's first)")
	progressJSON := fs.Bool("json", false, "report the steps as JSON lines on stderr")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *to == "" {
		return usagef("usage: kelpie --server URL agent move NAME --to HOST_ID")
	}
	c, err := e.client()
	if err != nil {
		return err
	}
	start := time.Now()
	a, err := c.Move(ctx, pos[0], server.MoveRequest{To: *to, Store: *store}, func(ev server.Event) {
		if *progressJSON {
			b, _ := json.Marshal(ev)
			fmt.Fprintf(e.stderr, "%s\n", b)
			return
		}
		if ev.Op == "protocol" {
			fmt.Fprintf(e.stderr, "kelpie: move: %s\n", ev.Step)
		} else {
			fmt.Fprintf(e.stderr, "kelpie: %s: %-14s %8.1f ms\n", ev.Op, ev.Step, ev.Ms)
		}
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stderr, "kelpie: agent %s runs on %s (epoch %d), moved in %.0f ms\n", a.Name, a.Owner, a.Epoch, ms(time.Since(start)))
	fmt.Fprintln(e.stdout, a.Owner)
	return nil
}

func cmdHost(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || (args[0] != "ls" && args[0] != "list") {
		return usagef("usage: kelpie --server URL host ls [--json]")
	}
	fs := newFlags(e, "host ls")
	asJSON := fs.Bool("json", false, "print JSON")
	regFlag := fs.String("registry", "", registryFlagHelp)
	pos, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("usage: kelpie --server URL host ls [--json]")
	}
	var hosts []registry.Host
	err = readRegistry(ctx, e, *regFlag, func(c *server.Client) (err error) {
		hosts, err = c.Hosts(ctx)
		return err
	}, func(r registry.Registry) (err error) {
		hosts, err = r.Hosts(ctx)
		return err
	})
	if err != nil {
		return err
	}
	if hosts == nil {
		hosts = []registry.Host{}
	}
	if *asJSON {
		return json.NewEncoder(e.stdout).Encode(hosts)
	}
	tw := tabwriter.NewWriter(e.stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tADDRESS\tALIVE\tSINCE")
	for _, h := range hosts {
		fmt.Fprintf(tw, "%s\t%s\t%v\t%s\n", h.ID, orDash(h.Address), h.Alive, h.Since.Format(time.RFC3339))
	}
	return tw.Flush()
}

func teleportOutRemote(ctx context.Context, e *env, name, store string, keep bool, agentID, format string) error {
	c, err := e.client()
	if err != nil {
		return err
	}
	res, err := c.TeleportOut(ctx, server.OutRequest{Name: name, Store: store, KeepSource: keep, AgentID: agentID, Format: format}, nil)
	if err != nil {
		return err
	}
	if res.Warning != "" {
		fmt.Fprintf(e.stderr, "kelpie: warning: %s\n", res.Warning)
	}
	if res.Agent != nil {
		fmt.Fprintf(e.stderr, "kelpie: agent %s is in flight in %s (epoch %d)\n", res.Agent.Name, res.Package.ID, res.Agent.Epoch)
	}
	fmt.Fprintln(e.stdout, res.Package.ID)
	return nil
}

func teleportInRemote(ctx context.Context, e *env, pkg, store, name string) error {
	c, err := e.client()
	if err != nil {
		return err
	}
	res, err := c.TeleportIn(ctx, server.InRequest{Package: pkg, Store: store, Name: name}, nil)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stderr, "kelpie: vm %s restored from package %s\n", res.VM.Name, res.Package.ID)
	fmt.Fprintln(e.stdout, res.VM.Name)
	return nil
}
