// Command kelpie is the Kelpie Teleport command line: snapshot blobs,
// packages, VMs, teleports, the simulation and the demo. It parses flags,
// calls the packages below and prints; it holds no logic of its own.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/vm"
)

// env is what a command may touch; tests give it buffers.
type env struct {
	stdout, stderr io.Writer
	getenv         func(string) string
	// server is the daemon the commands go through (--server or
	// KELPIE_SERVER); "" runs them on this home.
	server string
	// unenforced: the command changed where an agent runs without a
	// registry; a successful command says so.
	unenforced bool
}

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, e *env, args []string) error
}

// commands is filled by each command's file (init), so the table lists
// what the binary really has. Order of registration is the help order.
var commands []command

func register(c command) { commands = append(commands, c) }

// usageError marks a mistake in how kelpie was called (exit 2).
type usageError struct{ msg string }

func (u usageError) Error() string { return u.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, &env{stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}, os.Args[1:])
	stop()
	os.Exit(code)
}

// run executes one kelpie invocation and returns its exit code. Errors are
// printed as one line; a panic is reported, not dumped.
func run(ctx context.Context, e *env, args []string) (code int) {
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(e.stderr, "kelpie: internal error: %v (please report this)\n", r)
			code = 70
		}
	}()
	args, err := globalFlags(e, args)
	if err != nil {
		return report(e, err)
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		printHelp(e.stdout)
		return 0
	}
	for _, c := range commands {
		if c.name == args[0] {
			err := c.run(ctx, e, args[1:])
			return report(e, err)
		}
	}
	fmt.Fprintf(e.stderr, "kelpie: unknown command %q; run 'kelpie help' for the list\n", args[0])
	return 2
}

// globalFlags takes the flags that come before the command: --server URL
// (default $KELPIE_SERVER).
func globalFlags(e *env, args []string) ([]string, error) {
	e.server = e.getenv("KELPIE_SERVER")
	for len(args) > 0 {
		a := args[0]
		switch {
		case a == "--server" || a == "-server":
			if len(args) < 2 || strings.HasPrefix(args[1], "-") {
				return nil, usagef("--server needs a URL (http://HOST:PORT)")
			}
			e.server, args = args[1], args[2:]
		case strings.HasPrefix(a, "--server=") || strings.HasPrefix(a, "-server="):
			_, e.server, _ = strings.Cut(a, "=")
			args = args[1:]
		default:
			if e.server != "" && !strings.HasPrefix(e.server, "http://") && !strings.HasPrefix(e.server, "https://") {
				return nil, usagef("--server %q: want http://HOST:PORT or https://HOST:PORT", e.server)
			}
			return args, nil
		}
	}
	return args, nil
}

// exitError lets a command choose its exit code (vm exec passes the guest's).
type exitError struct{ code int }

func (x exitError) Error() string { return fmt.Sprintf("exit %d", x.code) }

func report(e *env, err error) int {
	if err == nil {
		if e.unenforced {
			fmt.Fprintln(e.stderr, "kelpie: note: no registry (--registry or KELPIE_REGISTRY): single activation is not enforced")
		}
		return 0
	}
	var x exitError
	if errors.As(err, &x) {
		return x.code
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	fmt.Fprintf(e.stderr, "kelpie: %s\n", msg)
	if isUsage(err) {
		return 2
	}
	return 1
}

// isUsage: err is a mistake in how kelpie was called: a flag, a name, a
// value, a store address, options that do not go together.
func isUsage(err error) bool {
	var u usageError
	return errors.As(err, &u) || errors.Is(err, vm.ErrInvalidConfig) || errors.Is(err, teleport.ErrInvalidID) ||
		errors.Is(err, teleport.ErrInvalidStore) || errors.Is(err, host.ErrInvalidRequest) || errors.Is(err, host.ErrUnknownBackend)
}

func printHelp(w io.Writer) {
	fmt.Fprintln(w, "kelpie: move running sandbox VMs between hosts (Kelpie Teleport)")
	fmt.Fprintln(w, "\nCommands:")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'kelpie COMMAND -h' for a command's flags. KELPIE_HOME selects this host's home (default ~/.kelpie).")
	fmt.Fprintln(w, "kelpie --server URL COMMAND (or KELPIE_SERVER) runs agent, host, vm, teleport and package commands through a daemon")
	fmt.Fprintln(w, "(kelpie serve); KELPIE_TOKEN or --token-file carries its token. --registry URL (or KELPIE_REGISTRY) makes")
	fmt.Fprintln(w, "the commands that change where an agent runs obey the registry's ownership rules without a daemon.")
}

// helpOut remembers where each flag set prints its -h text; errors are
// reported by main as one line, so the flag package itself prints nothing.
var helpOut sync.Map // *flag.FlagSet -> io.Writer

// newFlags makes a flag set that reports errors instead of exiting.
func newFlags(e *env, name string) *flag.FlagSet {
	fs := flag.NewFlagSet("kelpie "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	helpOut.Store(fs, e.stdout)
	return fs
}

// parse parses flags that may come before, between or after positional
// arguments ("unpack FILE --out-dir DIR"); everything after "--" is
// positional ("vm exec NAME -- CMD ARGS").
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var rest []string
	for i, a := range args {
		if a == "--" {
			args, rest = args[:i], args[i+1:]
			break
		}
	}
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				if w, ok := helpOut.Load(fs); ok {
					fmt.Fprintf(w.(io.Writer), "Usage of %s:\n", fs.Name())
					fs.SetOutput(w.(io.Writer))
					fs.PrintDefaults()
				}
				return nil, err
			}
			return nil, usageError{err.Error()}
		}
		args = fs.Args()
		if len(args) == 0 {
			return append(pos, rest...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// home is this host's Kelpie home directory.
func home(e *env) string {
	if h := e.getenv("KELPIE_HOME"); h != "" {
		return h
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".kelpie")
	}
	return ".kelpie"
}

// wantArgs checks the positional count.
func wantArgs(pos []string, n int, usage string) error {
	if len(pos) != n {
		return usagef("usage: %s", usage)
	}
	return nil
}
