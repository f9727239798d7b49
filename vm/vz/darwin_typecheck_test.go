package vz

import (
	"bufio"
	"fmt"
	"go/ast"
	"go/build"
	"go/parser"
	"go/token"
	"go/types"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"unicode"
)

// The darwin glue cannot be compiled here (it needs cgo and Apple's
// headers), so this test type-checks it for darwin/arm64 against the
// source of github.com/Code-Hex/vz/v3 vzVersion in the module cache,
// treating cgo's C package as opaque. A misspelt framework call or a
// wrong signature fails here.
const (
	vzModule  = "github.com/Code-Hex/vz/v3"
	vzVersion = "v3.7.1"
	ourModule = "github.com/kelpie/teleport"
)

func TestDarwinGlueTypeChecks(t *testing.T) {
	if testing.Short() {
		t.Skip("type-checks the standard library for darwin; skipped with -short")
	}
	cache := goEnv(t, "GOMODCACHE")
	vzDir := filepath.Join(cache, escapeModule(vzModule)+"@"+vzVersion)
	if _, err := os.Stat(vzDir); err != nil {
		t.Skipf("%s@%s is not in the module cache; run: go mod download %s@%s", vzModule, vzVersion, vzModule, vzVersion)
	}
	roots := map[string]string{vzModule: vzDir, ourModule: filepath.Dir(goEnv(t, "GOMOD"))}
	reqs, err := requirements(filepath.Join(vzDir, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	for mod, ver := range reqs {
		dir := filepath.Join(cache, escapeModule(mod)+"@"+ver)
		if _, err := os.Stat(dir); err != nil {
			t.Skipf("%s@%s (needed by %s) is not in the module cache; run: go mod download %s@%s", mod, ver, vzModule, vzModule, vzVersion)
		}
		roots[mod] = dir
	}
	ctxt := build.Default
	ctxt.GOOS, ctxt.GOARCH, ctxt.CgoEnabled = "darwin", "arm64", true
	im := &srcImporter{ctxt: ctxt, fset: token.NewFileSet(), roots: roots, pkgs: map[string]*types.Package{}}
	target := ourModule + "/vm/vz"
	files, problems, err := im.check(target, true)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(files, " "), "hypervisor_darwin.go") || strings.Contains(strings.Join(files, " "), "hypervisor_other.go") {
		t.Fatalf("checked files %v: the build constraints do not select the darwin glue", files)
	}
	for _, p := range problems {
		t.Error(p)
	}
}

func goEnv(t *testing.T, key string) string {
	t.Helper()
	out, err := exec.Command("go", "env", key).Output()
	if err != nil {
		t.Skipf("go env %s: %v", key, err)
	}
	return strings.TrimSpace(string(out))
}

// escapeModule applies the module cache's case encoding ("!" + lower).
func escapeModule(path string) string {
	var b strings.Builder
	for _, r := range path {
		if unicode.IsUpper(r) {
			b.WriteByte('!')
			r = unicode.ToLower(r)
		}
		b.WriteRune(r)
	}
	return b.String()
}

func requirements(gomod string) (map[string]string, error) {
	f, err := os.Open(gomod)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	reqs := map[string]string{}
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(strings.Split(sc.Text(), "//")[0])
		switch {
		case line == "require (":
			in = true
			continue
		case line == ")":
			in = false
			continue
		case strings.HasPrefix(line, "require "):
			line = strings.TrimPrefix(line, "require ")
		case !in:
			continue
		}
		if fields := strings.Fields(line); len(fields) == 2 {
			reqs[fields[0]] = fields[1]
		}
	}
	return reqs, sc.Err()
}

type srcImporter struct {
	ctxt  build.Context
	fset  *token.FileSet
	roots map[string]string
	pkgs  map[string]*types.Package
}

func (im *srcImporter) dir(path string) string {
	best := ""
	for p := range im.roots {
		if (path == p || strings.HasPrefix(path, p+"/")) && len(p) > len(best) {
			best = p
		}
	}
	if best != "" {
		return filepath.Join(im.roots[best], strings.TrimPrefix(path, best))
	}
	std := filepath.Join(runtime.GOROOT(), "src", path)
	if _, err := os.Stat(std); err == nil {
		return std
	}
	return filepath.Join(runtime.GOROOT(), "src", "vendor", path)
}

func (im *srcImporter) Import(path string) (*types.Package, error) {
	if path == "unsafe" {
		return types.Unsafe, nil
	}
	if p, ok := im.pkgs[path]; ok {
		return p, nil
	}
	_, _, err := im.check(path, false)
	return im.pkgs[path], err
}

// check type-checks one package; with report, its type errors are
// returned (dependencies are only needed for their exported types).
func (im *srcImporter) check(path string, report bool) (files, problems []string, err error) {
	bp, err := im.ctxt.ImportDir(im.dir(path), 0)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	var parsed []*ast.File
	for _, f := range append(append([]string{}, bp.GoFiles...), bp.CgoFiles...) {
		af, err := parser.ParseFile(im.fset, filepath.Join(bp.Dir, f), nil, 0)
		if err != nil {
			return nil, nil, err
		}
		parsed = append(parsed, af)
		files = append(files, f)
	}
	conf := types.Config{Importer: im, FakeImportC: true, Error: func(err error) {
		if report {
			problems = append(problems, err.Error())
		}
	}}
	pkg, _ := conf.Check(path, im.fset, parsed, nil)
	im.pkgs[path] = pkg
	return files, problems, nil
}
