package qemu

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"

	"github.com/kelpie/teleport/guest/agent"
	"github.com/kelpie/teleport/vm"
)

// WorkspaceDir is the guest directory a checkpoint carries.
const WorkspaceDir = "/workspace"

// CopyFromGuest streams a guest file into w, one agent chunk at a time.
func (v *Instance) CopyFromGuest(ctx context.Context, guestPath string, w io.Writer) (int64, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.copyFromGuest(ctx, guestPath, w)
}

func (v *Instance) copyFromGuest(ctx context.Context, guestPath string, w io.Writer) (int64, error) {
	if err := v.check(ctx, vm.OpExec); err != nil {
		return 0, err
	}
	c, err := v.agentConn(ctx)
	if err != nil {
		return 0, v.failed("read guest file", err)
	}
	var off int64
	for {
		var r agent.ReadFileResult
		if err := c.Call(ctx, agent.OpReadFile, agent.ReadFileRequest{Path: guestPath, Offset: off, Limit: agent.MaxChunk}, &r); err != nil {
			return off, v.guestErr("read "+guestPath, err)
		}
		if len(r.Data) > 0 {
			if _, err := w.Write(r.Data); err != nil {
				return off, err
			}
			off += int64(len(r.Data))
		}
		if r.EOF || len(r.Data) == 0 {
			return off, nil
		}
	}
}

// CopyToGuest streams r into a new guest file (parents created).
func (v *Instance) CopyToGuest(ctx context.Context, r io.Reader, guestPath string, mode fs.FileMode) (int64, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.copyToGuest(ctx, r, guestPath, mode)
}

func (v *Instance) copyToGuest(ctx context.Context, r io.Reader, guestPath string, mode fs.FileMode) (int64, error) {
	if err := v.check(ctx, vm.OpExec); err != nil {
		return 0, err
	}
	c, err := v.agentConn(ctx)
	if err != nil {
		return 0, v.failed("write guest file", err)
	}
	buf := make([]byte, agent.MaxChunk)
	var total int64
	first := true
	for {
		n, rerr := io.ReadFull(r, buf)
		if n > 0 || first {
			req := agent.WriteFileRequest{Path: guestPath, Data: buf[:n], Mode: mode, Append: !first, MkdirAll: first}
			if err := c.Call(ctx, agent.OpWriteFile, req, &agent.WriteFileResult{}); err != nil {
				return total, v.guestErr("write "+guestPath, err)
			}
			total += int64(n)
			first = false
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

func (v *Instance) guestErr(what string, err error) error {
	var re *agent.RemoteError
	if errors.As(err, &re) {
		return fmt.Errorf("vm %s: %s: %v: %w", v.rec.Name, what, err, vm.ErrGuest)
	}
	return v.failed(what, err)
}

// guestShell runs a shell command and fails unless it exits 0.
func (v *Instance) guestShell(ctx context.Context, script string) error {
	if err := v.check(ctx, vm.OpExec); err != nil {
		return err
	}
	c, err := v.agentConn(ctx)
	if err != nil {
		return v.failed(vm.OpExec, err)
	}
	res, err := c.Exec(ctx, agent.ExecRequest{Shell: script, Workdir: "/"})
	if err != nil {
		return v.guestErr("exec", err)
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("vm %s: %q exited %d: %s: %w", v.rec.Name, script, res.ExitCode, strings.TrimSpace(string(res.Stderr)), vm.ErrGuest)
	}
	return nil
}

func tempName(prefix string) string {
	var b [6]byte
	rand.Read(b[:])
	return "/tmp/" + prefix + hex.EncodeToString(b[:])
}

// ArchiveWorkspace writes the guest's /workspace as a gzip'd tar to w
// (busybox tar in the guest, streamed out through the agent).
func (v *Instance) ArchiveWorkspace(ctx context.Context, w io.Writer) (int64, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	tmp := tempName(".kelpie-ws-out-") + ".tgz"
	if err := v.guestShell(ctx, "tar -czf "+tmp+" -C "+WorkspaceDir+" ."); err != nil {
		v.guestShell(context.WithoutCancel(ctx), "rm -f "+tmp)
		return 0, fmt.Errorf("archive workspace: %w", err)
	}
	n, err := v.copyFromGuest(ctx, tmp, w)
	if rerr := v.guestShell(context.WithoutCancel(ctx), "rm -f "+tmp); err == nil && rerr != nil {
		err = rerr
	}
	return n, err
}

// RestoreWorkspace unpacks a gzip'd tar from r into the guest's
// /workspace.
func (v *Instance) RestoreWorkspace(ctx context.Context, r io.Reader) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	tmp := tempName(".kelpie-ws-in-") + ".tgz"
	if _, err := v.copyToGuest(ctx, r, tmp, 0o600); err != nil {
		v.guestShell(context.WithoutCancel(ctx), "rm -f "+tmp)
		return fmt.Errorf("restore workspace: %w", err)
	}
	err := v.guestShell(ctx, "mkdir -p "+WorkspaceDir+" && tar -xzf "+tmp+" -C "+WorkspaceDir+"; s=$?; rm -f "+tmp+"; exit $s")
	if err != nil {
		return fmt.Errorf("restore workspace: %w", err)
	}
	return nil
}
