package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/guest/image"
	"github.com/kelpie/teleport/service"
	"github.com/kelpie/teleport/store/fs"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

// kelpie runs one CLI invocation in-process.
func kelpie(t *testing.T, envVars map[string]string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	code = run(context.Background(), &env{stdout: &o, stderr: &e, getenv: func(k string) string { return envVars[k] }}, args)
	return o.String(), e.String(), code
}

type vector struct {
	Valid       bool   `json:"valid"`
	ErrorKind   string `json:"error_kind"`
	BlobSHA256  string `json:"blob_sha256"`
	MetadataLen uint64 `json:"metadata_len"`
	SnapshotLen uint64 `json:"snapshot_len"`
	MemoryLen   uint64 `json:"memory_len"`
}

func fileSum(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func vectorDirs(t *testing.T) []string {
	dirs, _ := filepath.Glob("../../testdata/klp1/*")
	if len(dirs) == 0 {
		t.Fatal("no vectors")
	}
	return dirs
}

func loadExpect(t *testing.T, dir string) vector {
	var v vector
	raw, _ := os.ReadFile(filepath.Join(dir, "expect.json"))
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestBlobVectorsThroughCLI(t *testing.T) {
	dirs, _ := filepath.Glob("../../testdata/klp1/*")
	if len(dirs) == 0 {
		t.Fatal("no vectors")
	}
	for _, dir := range dirs {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			var v vector
			raw, _ := os.ReadFile(filepath.Join(dir, "expect.json"))
			if err := json.Unmarshal(raw, &v); err != nil {
				t.Fatal(err)
			}
			blobPath := filepath.Join(dir, "blob")
			out, errOut, code := kelpie(t, nil, "blob", "inspect", blobPath, "--json")
			if !v.Valid {
				if code == 0 || !strings.Contains(errOut, v.ErrorKind) || strings.Count(errOut, "\n") != 1 {
					t.Fatalf("inspect of invalid blob: code %d stderr %q (want one line with %q)", code, errOut, v.ErrorKind)
				}
				_, errOut, code = kelpie(t, nil, "blob", "unpack", blobPath, "--out-dir", t.TempDir())
				if code == 0 || !strings.Contains(errOut, v.ErrorKind) {
					t.Fatalf("unpack of invalid blob: code %d stderr %q", code, errOut)
				}
				return
			}
			if code != 0 {
				t.Fatalf("inspect: %s", errOut)
			}
			var got struct{ Version, MetadataLen, SnapshotLen, MemoryLen uint64 }
			var m map[string]uint64
			json.Unmarshal([]byte(out), &m)
			got.Version, got.MetadataLen, got.SnapshotLen, got.MemoryLen = m["version"], m["metadata_len"], m["snapshot_len"], m["memory_len"]
			if got.Version != 1 || got.MetadataLen != v.MetadataLen || got.SnapshotLen != v.SnapshotLen || got.MemoryLen != v.MemoryLen {
				t.Fatalf("inspect = %s", out)
			}
			// pack the inputs: exactly the expected bytes.
			tmp := t.TempDir()
			packed := filepath.Join(tmp, "blob")
			args := []string{"blob", "pack", "--format", "v1", "--metadata", filepath.Join(dir, "metadata"), "--snapshot", filepath.Join(dir, "snapshot"), "--out", packed}
			if v.MemoryLen > 0 {
				args = append(args, "--memory", filepath.Join(dir, "memory"))
			}
			if _, errOut, code := kelpie(t, nil, args...); code != 0 {
				t.Fatalf("pack: %s", errOut)
			}
			if fileSum(t, packed) != v.BlobSHA256 {
				t.Fatal("packed blob differs from the vector")
			}
			// unpack: the inputs back.
			un := filepath.Join(tmp, "un")
			if _, errOut, code := kelpie(t, nil, "blob", "unpack", blobPath, "--out-dir", un); code != 0 {
				t.Fatalf("unpack: %s", errOut)
			}
			for _, s := range []string{"metadata", "snapshot", "memory"} {
				if fileSum(t, filepath.Join(un, s)) != fileSum(t, filepath.Join(dir, s)) {
					t.Fatalf("unpacked %s differs", s)
				}
			}
		})
	}
}

// Version 2 through the CLI: the vectors' sections pack into a version 2
// blob (the memory section as a raw image), inspect shows its structure,
// and unpack gives every section back byte for byte; a damaged blob is
// refused with one line.
func TestBlobV2CLI(t *testing.T) {
	for _, dir := range vectorDirs(t) {
		v := loadExpect(t, dir)
		if !v.Valid {
			continue
		}
		t.Run(filepath.Base(dir), func(t *testing.T) {
			tmp := t.TempDir()
			packed := filepath.Join(tmp, "blob2")
			args := []string{"blob", "pack", "--metadata", filepath.Join(dir, "metadata"), "--snapshot", filepath.Join(dir, "snapshot"), "--out", packed}
			if v.MemoryLen > 0 {
				args = append(args, "--memory", filepath.Join(dir, "memory"))
			}
			if _, errOut, code := kelpie(t, nil, args...); code != 0 {
				t.Fatalf("pack: %s", errOut)
			}
			out, errOut, code := kelpie(t, nil, "blob", "inspect", packed, "--json")
			if code != 0 {
				t.Fatalf("inspect: %s", errOut)
			}
			var in map[string]any
			if err := json.Unmarshal([]byte(out), &in); err != nil {
				t.Fatal(err)
			}
			if in["version"] != 2.0 || in["form"] != "file" || in["metadata_len"] != float64(v.MetadataLen) || in["snapshot_len"] != float64(v.SnapshotLen) ||
				in["memory_len"] != float64(v.MemoryLen) || in["chunk_bytes"] != 65536.0 || in["hash"] != "blake3" {
				t.Fatalf("inspect = %s", out)
			}
			if text, _, code := kelpie(t, nil, "blob", "inspect", packed); code != 0 || !strings.Contains(text, "KLP1 version 2") || !strings.Contains(text, "distinct chunks") {
				t.Fatalf("inspect text: %q", text)
			}
			un := filepath.Join(tmp, "un")
			if _, errOut, code := kelpie(t, nil, "blob", "unpack", packed, "--out-dir", un); code != 0 {
				t.Fatalf("unpack: %s", errOut)
			}
			for _, s := range []string{"metadata", "snapshot", "memory"} {
				if fileSum(t, filepath.Join(un, s)) != fileSum(t, filepath.Join(dir, s)) {
					t.Fatalf("unpacked %s differs", s)
				}
			}
			b, err := os.ReadFile(packed)
			if err != nil {
				t.Fatal(err)
			}
			b[100] ^= 1
			os.WriteFile(packed, b, 0o644)
			_, errOut, code = kelpie(t, nil, "blob", "inspect", packed)
			if code != 1 || !strings.Contains(errOut, "malformed") || strings.Count(errOut, "\n") != 1 {
				t.Fatalf("inspect of a damaged blob: code %d, %q", code, errOut)
			}
		})
	}
}

func TestUsageErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"nope"}, 2, "unknown command"},
		{[]string{"blob"}, 2, "usage"},
		{[]string{"blob", "pack", "--out", "x"}, 2, "usage"},
		{[]string{"blob", "pack", "--format", "v3", "--metadata", "a", "--snapshot", "b", "--out", "c"}, 2, "v3"},
		{[]string{"vm", "snapshot", "x", "--out", "f", "--format", "v0"}, 2, "--format"},
		{[]string{"teleport", "out", "x", "--format", "zip"}, 2, "--format"},
		{[]string{"vm", "create", "x", "--backend", "hyperv"}, 2, "unknown backend"},
		{[]string{"vm", "create", "x", "--accel", "hvf"}, 2, "accelerator"},
		{[]string{"vm", "snapshot", "x", "--out", "f", "--layout", "sideways"}, 2, "--layout"},
		{[]string{"blob", "inspect", "/does/not/exist"}, 1, "no such file"},
		{[]string{"blob", "inspect", "--bogus"}, 2, "flag provided but not defined"},
		{[]string{"package", "show", "../../etc/passwd"}, 2, "invalid package id"},
		{[]string{"package", "show", "missing-id"}, 1, "not found"},
		{[]string{"package", "frob"}, 2, "unknown package command"},
		{[]string{"demo", "--backend", "vmware"}, 2, "want auto"},
	} {
		_, errOut, code := kelpie(t, map[string]string{"KELPIE_HOME": t.TempDir()}, c.args...)
		if code != c.code || !strings.Contains(errOut, c.want) || strings.Count(errOut, "\n") != 1 || strings.Contains(errOut, "goroutine") {
			t.Errorf("%v: code %d stderr %q; want code %d and one line containing %q", c.args, code, errOut, c.code, c.want)
		}
	}
}

// makePackage teleports a sim VM into a filesystem store, as a host would.
func makePackage(t *testing.T, storeDir string, o sim.Options, kind teleport.SnapshotKind) *teleport.Package {
	t.Helper()
	ctx := context.Background()
	st, err := fs.Open(storeDir)
	if err != nil {
		t.Fatal(err)
	}
	f := sim.NewFactory(o)
	svc := service.New(st, f, service.WithClock(f.Options().Clock))
	inst, _ := f.Create(ctx, vm.Config{VCPUs: 1, MemoryMiB: 64})
	inst.Start(ctx)
	inst.Exec(ctx, "set", []string{"k", "v"}, vm.ExecOptions{})
	pkg, err := svc.Out(ctx, inst, service.OutRequest{AgentID: "agent-x", Kind: kind})
	if err != nil {
		t.Fatal(err)
	}
	return pkg
}

func TestPackageCommands(t *testing.T) {
	storeDir := t.TempDir()
	envs := map[string]string{"KELPIE_HOME": t.TempDir(), "KELPIE_BACKEND": "sim", "KELPIE_HOST_ID": "host-a"}
	pkg := makePackage(t, storeDir, sim.Options{HostID: "host-a", Arch: vm.HostArchitecture(), BaseImageVersion: image.Version()}, teleport.KindSuspend)

	out, errOut, code := kelpie(t, envs, "package", "ls", "--store", storeDir)
	if code != 0 || !strings.Contains(out, pkg.ID) || !strings.Contains(out, "suspend") {
		t.Fatalf("ls: %d %s %s", code, out, errOut)
	}
	out, _, code = kelpie(t, envs, "package", "ls", "--store", storeDir, "--json")
	var list []teleport.Package
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil || len(list) != 1 || list[0].ID != pkg.ID {
		t.Fatalf("ls --json: %s", out)
	}
	out, _, code = kelpie(t, envs, "package", "show", pkg.ID, "--store", storeDir, "--json")
	var shown teleport.Package
	if code != 0 || json.Unmarshal([]byte(out), &shown) != nil || shown.BlobSHA256 != pkg.BlobSHA256 {
		t.Fatalf("show: %s", out)
	}
	out, errOut, code = kelpie(t, envs, "package", "verify", pkg.ID, "--store", storeDir)
	if code != 0 || !strings.Contains(out, "ok") {
		t.Fatalf("verify: %d %s %s", code, out, errOut)
	}

	// Same host: restorable. Another host: the suspend rule says why not.
	out, _, code = kelpie(t, envs, "package", "show", pkg.ID, "--store", storeDir, "--can-restore-here")
	if code != 0 || !strings.Contains(out, "can be restored on this host") {
		t.Fatalf("can-restore-here on the same host: %d %s", code, out)
	}
	other := map[string]string{"KELPIE_HOME": t.TempDir(), "KELPIE_BACKEND": "sim", "KELPIE_HOST_ID": "host-b"}
	out, errOut, code = kelpie(t, other, "package", "show", pkg.ID, "--store", storeDir, "--can-restore-here")
	if code == 0 || !strings.Contains(out, "FAIL host") || !strings.Contains(out, "suspend restores only on the host that made it") {
		t.Fatalf("can-restore-here on another host: %d %s %s", code, out, errOut)
	}

	// Corrupt the blob at rest: verify fails with a checksum error.
	blobPath := filepath.Join(storeDir, "packages", pkg.ID, "blob")
	b, _ := os.ReadFile(blobPath)
	b[len(b)-1] ^= 1
	os.WriteFile(blobPath, b, 0o644)
	_, errOut, code = kelpie(t, envs, "package", "verify", pkg.ID, "--store", storeDir)
	if code == 0 || !strings.Contains(errOut, "checksum mismatch") {
		t.Fatalf("verify of corrupt blob: %d %s", code, errOut)
	}

	out, _, code = kelpie(t, envs, "package", "rm", pkg.ID, "--store", storeDir)
	if code != 0 {
		t.Fatalf("rm: %s", out)
	}
	_, errOut, code = kelpie(t, envs, "package", "show", pkg.ID, "--store", storeDir)
	if code == 0 || !strings.Contains(errOut, "not found") {
		t.Fatalf("show after rm: %d %s", code, errOut)
	}
}

func TestDemoSim(t *testing.T) {
	out, errOut, code := kelpie(t, nil, "demo", "--backend", "sim")
	if code != 0 || !strings.Contains(out, "demo complete") || !strings.Contains(out, "architecture mismatch") {
		t.Fatalf("demo: %d\n%s\n%s", code, out, errOut)
	}
}
