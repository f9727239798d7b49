package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kelpie/teleport/host"
	"github.com/kelpie/teleport/registry/registrytest"
	"github.com/kelpie/teleport/server"
)

// selfSigned writes a certificate for 127.0.0.1 and its key.
func selfSigned(t *testing.T, dir string) (cert, key string) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kelpie test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(k)
	cert, key = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	return cert, key
}

// The daemon itself (RunDaemon, what `kelpie serve` runs): https with
// --tls-cert/--tls-key, the token from --token-file, a refusal to listen
// beyond loopback without one, and a graceful stop when its context ends.
func TestDaemonTLSAndToken(t *testing.T) {
	dir := t.TempDir()
	cert, key := selfSigned(t, dir)
	tokenFile := filepath.Join(dir, "token")
	os.WriteFile(tokenFile, []byte("tls-token\n"), 0o600)
	listen := registrytest.FreeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- server.RunDaemon(ctx, server.DaemonConfig{Home: filepath.Join(dir, "home"), Listen: listen, Registry: registryURL(t),
			TokenFile: tokenFile, TLSCert: cert, TLSKey: key, Backends: []host.Backend{host.SimBackend()},
			OnReady: func(url string) { ready <- url }, Log: slog.New(slog.DiscardHandler)})
	}()
	var url string
	select {
	case url = <-ready:
	case err := <-done:
		t.Fatalf("daemon: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("daemon not ready")
	}
	if !strings.HasPrefix(url, "https://") {
		t.Fatalf("url %s", url)
	}
	c, err := server.NewClientTLS(url, server.ClientOptions{Token: "tls-token", CAFile: cert})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Hosts(context.Background()); err != nil {
		t.Fatalf("hosts over https with the token: %v", err)
	}
	bad, _ := server.NewClientTLS(url, server.ClientOptions{Token: "wrong", CAFile: cert})
	var apiErr *server.APIError
	if _, err := bad.Hosts(context.Background()); !errors.As(err, &apiErr) || apiErr.Status != 401 {
		t.Fatalf("a wrong token over https: %v", err)
	}
	plain := server.NewClient(url, server.ClientOptions{Token: "tls-token"})
	if _, err := plain.Hosts(context.Background()); err == nil {
		t.Fatal("a client that does not trust the certificate got through")
	}
	// The home is the daemon's: the CLI's lock is refused.
	if _, err := host.UseHome(filepath.Join(dir, "home")); !errors.Is(err, host.ErrServed) || !strings.Contains(err.Error(), url) {
		t.Fatalf("CLI lock on a served home: %v", err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("graceful stop: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("daemon did not stop")
	}
	if l, err := host.UseHome(filepath.Join(dir, "home")); err != nil {
		t.Fatalf("after the daemon stopped, the home is free: %v", err)
	} else {
		l.Release()
	}
	// Beyond loopback without a token: refused before anything starts.
	err = server.RunDaemon(context.Background(), server.DaemonConfig{Home: filepath.Join(dir, "home2"), Listen: "0.0.0.0:0", Registry: registryURL(t)})
	if !errors.Is(err, server.ErrInsecureListen) {
		t.Fatalf("0.0.0.0 without a token: %v", err)
	}
}

// A daemon given no registry starts an embedded member in its home and
// registers there.
func TestDaemonEmbeddedRegistry(t *testing.T) {
	dir := t.TempDir()
	addrs := registrytest.FreeMemberAddrs(t, 2)
	regListen := addrs[0]
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- server.RunDaemon(ctx, server.DaemonConfig{Home: filepath.Join(dir, "home"), Listen: addrs[1], RegistryListen: regListen,
			Backends: []host.Backend{host.SimBackend()}, OnReady: func(url string) { ready <- url }, Log: slog.New(slog.DiscardHandler)})
	}()
	var url string
	select {
	case url = <-ready:
	case err := <-done:
		t.Fatalf("daemon: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("daemon not ready")
	}
	hosts, err := server.NewClient(url, server.ClientOptions{}).Hosts(context.Background())
	if err != nil || len(hosts) != 1 || !hosts[0].Alive || hosts[0].Address != url {
		t.Fatalf("hosts: %+v %v", hosts, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "home", "registry", "member")); err != nil {
		t.Fatalf("no member data in the home: %v", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
