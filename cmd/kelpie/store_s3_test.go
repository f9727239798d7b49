package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/kelpie/teleport"
	"github.com/kelpie/teleport/service"
	s3store "github.com/kelpie/teleport/store/s3"
	"github.com/kelpie/teleport/vm"
	"github.com/kelpie/teleport/vm/sim"
)

func TestS3FlagsFoldIntoURL(t *testing.T) {
	for _, tc := range []struct {
		args []string
		spec string
		want string
		err  string
	}{
		{nil, "s3://b/p", "s3://b/p", ""},
		{nil, "/some/dir", "/some/dir", ""},
		{[]string{"--s3-endpoint", "http://127.0.0.1:1"}, "s3://bkt/p", "s3://bkt/p?endpoint=http%3A%2F%2F127.0.0.1%3A1", ""},
		{[]string{"--s3-region", "eu-west-1", "--s3-path-style", "false"}, "s3://bkt/p?region=x", "s3://bkt/p?path_style=false&region=eu-west-1", ""},
		{[]string{"--s3-endpoint", "http://x"}, "/dir", "", "need --store s3://"},
		{[]string{"--s3-path-style", "sometimes"}, "s3://bkt/p", "", "want true or false"},
	} {
		fs := newFlags(&env{stderr: os.Stderr}, "test")
		f := addS3Flags(fs)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		got, err := f.storeSpec(tc.spec)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%v %s: err %v, want %q", tc.args, tc.spec, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%v %s: %q (%v), want %q", tc.args, tc.spec, got, err, tc.want)
		}
	}
}

func TestS3StoreURLMistakesAreUsageErrors(t *testing.T) {
	for _, spec := range []string{"s3://Bad_Bucket/p", "s3://bkt/p?endpont=x", "s3://bkt/a/../b", "s3://key:secret@bkt/p"} {
		_, errOut, code := kelpie(t, map[string]string{"KELPIE_HOME": t.TempDir()}, "package", "ls", "--store", spec)
		if code != 2 || strings.Count(errOut, "\n") != 1 || strings.Contains(errOut, "package store error") {
			t.Errorf("%s: code %d stderr %q, want a one-line usage error", spec, code, errOut)
		}
	}
}

// s3Env returns the CLI environment for the real server, or skips.
func s3Env(t *testing.T) (map[string]string, string) {
	t.Helper()
	ep := os.Getenv("KELPIE_S3_ENDPOINT")
	if ep == "" {
		t.Skip("KELPIE_S3_ENDPOINT is unset; run scripts/s3-test.sh to test against a real SeaweedFS server")
	}
	if !strings.HasPrefix(ep, "http://127.0.0.1:") && os.Getenv("KELPIE_S3_ALLOW_REMOTE") != "1" {
		t.Fatalf("KELPIE_S3_ENDPOINT %q is not on 127.0.0.1", ep)
	}
	bucket := os.Getenv("KELPIE_S3_BUCKET")
	if bucket == "" {
		bucket = "kelpie-test"
	}
	spec := fmt.Sprintf("s3://%s/cli-%08x", bucket, rand.Uint32())
	return map[string]string{"KELPIE_HOME": t.TempDir(), "KELPIE_BACKEND": "sim", "KELPIE_HOST_ID": "host-a",
		"KELPIE_S3_ENDPOINT": ep}, spec
}

func openS3ForTest(t *testing.T, envs map[string]string, spec string) *s3store.Store {
	t.Helper()
	o, err := s3store.ParseURL(spec, func(k string) string { return envs[k] })
	if err != nil {
		t.Fatal(err)
	}
	st, err := s3store.New(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		l, _ := st.List(ctx)
		for _, p := range l {
			st.Delete(ctx, p.ID)
		}
	})
	return st
}

// The package commands work on an s3:// store as on a directory: ls,
// show, verify (also of a blob damaged in the bucket), rm, gc.
func TestS3PackageCommands(t *testing.T) {
	envs, spec := s3Env(t)
	st := openS3ForTest(t, envs, spec)
	ctx := context.Background()
	f := sim.NewFactory(sim.Options{HostID: "host-a", Arch: vm.HostArchitecture(), MemoryBytes: 20 << 20})
	svc := service.New(st, f, service.WithClock(f.Options().Clock))
	inst, _ := f.Create(ctx, vm.Config{VCPUs: 1, MemoryMiB: 64})
	inst.Start(ctx)
	inst.Exec(ctx, "set", []string{"k", "v"}, vm.ExecOptions{})
	pkg, err := svc.Out(ctx, inst, service.OutRequest{AgentID: "agent-x", Kind: teleport.KindTeleport})
	if err != nil {
		t.Fatal(err)
	}

	out, errOut, code := kelpie(t, envs, "package", "ls", "--store", spec)
	if code != 0 || !strings.Contains(out, pkg.ID) {
		t.Fatalf("ls: %d %s %s", code, out, errOut)
	}
	out, _, code = kelpie(t, envs, "package", "show", pkg.ID, "--store", spec, "--json")
	var shown teleport.Package
	if code != 0 || json.Unmarshal([]byte(out), &shown) != nil || shown.BlobSHA256 != pkg.BlobSHA256 {
		t.Fatalf("show: %s", out)
	}
	out, errOut, code = kelpie(t, envs, "package", "verify", pkg.ID, "--store", spec)
	if code != 0 || !strings.Contains(out, "ok") {
		t.Fatalf("verify: %d %s %s", code, out, errOut)
	}
	out, errOut, code = kelpie(t, envs, "package", "gc", "--store", spec)
	if code != 0 || !strings.Contains(out, "removed 0") {
		t.Fatalf("gc: %d %s %s", code, out, errOut)
	}

	// Damage the blob in the bucket: verify names the checksum.
	damageBlob(t, envs, spec, pkg.ID)
	_, errOut, code = kelpie(t, envs, "package", "verify", pkg.ID, "--store", spec)
	if code == 0 || !strings.Contains(errOut, "checksum mismatch") || strings.Count(errOut, "\n") != 1 {
		t.Fatalf("verify of a damaged blob: %d %q", code, errOut)
	}
	if _, _, code = kelpie(t, envs, "package", "rm", pkg.ID, "--store", spec); code != 0 {
		t.Fatal("rm failed")
	}
	_, errOut, code = kelpie(t, envs, "package", "show", pkg.ID, "--store", spec)
	if code == 0 || !strings.Contains(errOut, "not found") {
		t.Fatalf("show after rm: %d %s", code, errOut)
	}
}

// damageBlob flips a byte of a package's blob object in the bucket.
func damageBlob(t *testing.T, envs map[string]string, spec, id string) {
	t.Helper()
	ctx := context.Background()
	o, _ := s3store.ParseURL(spec, func(k string) string { return envs[k] })
	cfg, err := config.LoadDefaultConfig(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := s3.NewFromConfig(cfg, func(so *s3.Options) { so.BaseEndpoint = aws.String(o.Endpoint); so.UsePathStyle = true })
	prefix := strings.Trim(o.Prefix, "/") + "/"
	get := func(key string) []byte {
		out, err := c.GetObject(ctx, &s3.GetObjectInput{Bucket: &o.Bucket, Key: &key})
		if err != nil {
			t.Fatal(err)
		}
		defer out.Body.Close()
		var b []byte
		buf := make([]byte, 1<<20)
		for {
			n, err := out.Body.Read(buf)
			b = append(b, buf[:n]...)
			if err != nil {
				return b
			}
		}
	}
	var mo struct{ Blob string }
	if err := json.Unmarshal(get(prefix+"manifests/"+id+".json"), &mo); err != nil {
		t.Fatal(err)
	}
	key := prefix + mo.Blob
	b := get(key)
	b[len(b)/2] ^= 0x40
	if _, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: &o.Bucket, Key: &key, Body: strings.NewReader(string(b))}); err != nil {
		t.Fatal(err)
	}
}

func TestS3WrongCredentialsOneLine(t *testing.T) {
	envs, spec := s3Env(t)
	t.Setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
	_, errOut, code := kelpie(t, envs, "package", "ls", "--store", spec)
	if code != 1 || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, "refused the credentials (SignatureDoesNotMatch)") {
		t.Fatalf("code %d stderr %q", code, errOut)
	}
	t.Logf("%s", strings.TrimSpace(errOut))
}
