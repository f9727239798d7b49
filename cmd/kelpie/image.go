package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/kelpie/teleport/guest/image"
)

func init() {
	register(command{"image", "build (or reuse) the guest image and install QEMU for this host", cmdImage})
}

const imageUsage = "kelpie image build"

// modulePath identifies a Kelpie source tree by its go.mod.
const modulePath = "github.com/kelpie/teleport"

func cmdImage(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || args[0] != "build" {
		return usagef("usage: %s", imageUsage)
	}
	fs := newFlags(e, "image build")
	pos, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usagef("usage: %s", imageUsage)
	}
	root, err := sourceRoot(e)
	if err != nil {
		return err
	}
	// setup-qemu.sh installs QEMU and the build tools, then runs
	// build-image.sh; both are idempotent and cache by a hash of their
	// inputs, so a second build takes well under a second.
	script := filepath.Join(root, "scripts", "setup-qemu.sh")
	if _, err := os.Stat(script); err != nil {
		script = filepath.Join(root, "scripts", "build-image.sh")
	}
	cmd := exec.CommandContext(ctx, "bash", script)
	cmd.Dir = root
	cmd.Env = os.Environ()
	if c := e.getenv("KELPIE_CACHE"); c != "" {
		cmd.Env = append(cmd.Env, "KELPIE_CACHE="+c)
	}
	cmd.Stderr = e.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("image build: %w", err)
	}
	// The scripts print the image directory last; pass the rest on.
	var last string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if last != "" {
			fmt.Fprintln(e.stderr, last)
		}
		last = sc.Text()
	}
	io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("image build: %s failed: %w", filepath.Base(script), err)
	}
	dir := strings.TrimSpace(last)
	m, err := image.LoadManifest(dir)
	if err != nil {
		return fmt.Errorf("image build: the script reported %q: %w", dir, err)
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		fmt.Fprintf(e.stderr, "kelpie: warning: image built, but qemu-system-x86_64 is not installed (run %s as root)\n", filepath.Join(root, "scripts", "setup-qemu.sh"))
	}
	fmt.Fprintf(e.stderr, "kelpie: guest image %s (kernel %s, agent %s)\n", m.Version, m.KernelVersion, m.AgentVersion)
	fmt.Fprintln(e.stdout, dir)
	return nil
}

// sourceRoot finds the Kelpie source tree the image is built from:
// $KELPIE_SRC, else the working directory or the kelpie binary's
// directory, or one of their parents.
func sourceRoot(e *env) (string, error) {
	var starts []string
	if s := e.getenv("KELPIE_SRC"); s != "" {
		if isSourceRoot(s) {
			return s, nil
		}
		return "", fmt.Errorf("KELPIE_SRC=%s is not a Kelpie source tree (no go.mod of %s with scripts/build-image.sh)", s, modulePath)
	}
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if exe, err := os.Executable(); err == nil {
		starts = append(starts, filepath.Dir(exe))
	}
	for _, s := range starts {
		for d := s; ; d = filepath.Dir(d) {
			if isSourceRoot(d) {
				return d, nil
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	return "", errors.New("cannot find the Kelpie source tree (scripts/build-image.sh); run kelpie from inside it or set KELPIE_SRC")
}

func isSourceRoot(d string) bool {
	b, err := os.ReadFile(filepath.Join(d, "go.mod"))
	if err != nil || !strings.Contains(string(b), "module "+modulePath) {
		return false
	}
	_, err = os.Stat(filepath.Join(d, "scripts", "build-image.sh"))
	return err == nil
}
