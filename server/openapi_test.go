package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/kelpie/teleport/server"
)

// The OpenAPI spec in the repo is held to the server: every route it
// describes is served and every served route is in it, and every answer
// of a scenario that touches each endpoint matches the schema the spec
// gives for its status (required fields, types, enums, and no field the
// spec does not name where it says additionalProperties: false).

type spec struct {
	Paths      map[string]map[string]json.RawMessage `json:"paths"`
	Components struct {
		Schemas   map[string]map[string]any `json:"schemas"`
		Responses map[string]map[string]any `json:"responses"`
	} `json:"components"`
}

func loadSpec(t *testing.T) *spec {
	b, err := yaml.YAMLToJSON(server.OpenAPI())
	if err != nil {
		t.Fatalf("openapi.yaml is not YAML: %v", err)
	}
	var s spec
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	json.Unmarshal(b, &raw)
	if v, _ := raw["openapi"].(string); !strings.HasPrefix(v, "3.") {
		t.Fatalf("openapi version %q, want 3.x", v)
	}
	return &s
}

var methods = []string{"get", "post", "put", "delete", "patch"}

func TestOpenAPIRoutes(t *testing.T) {
	s := loadSpec(t)
	f := newTestFleet(t, "")
	d := f.daemon("host-a")
	var inSpec []string
	for p, ops := range s.Paths {
		for m := range ops {
			if slices.Contains(methods, m) {
				inSpec = append(inSpec, strings.ToUpper(m)+" "+p)
			}
		}
	}
	served := d.srv.Routes()
	sort.Strings(inSpec)
	sort.Strings(served)
	if strings.Join(inSpec, "\n") != strings.Join(served, "\n") {
		t.Fatalf("the spec and the server disagree:\nspec:\n%s\nserved:\n%s", strings.Join(inSpec, "\n"), strings.Join(served, "\n"))
	}
	// And each route really answers (not the mux's not-found or
	// method-not-allowed).
	fill := strings.NewReplacer("{name}", "nobody", "{id}", "pkg-none")
	for _, r := range served {
		m, p, _ := strings.Cut(r, " ")
		status, body := d.call(m, fill.Replace(p), "", "{}", "Content-Type", "application/json")
		if strings.Contains(body, "no such endpoint") || status == http.StatusMethodNotAllowed {
			t.Errorf("%s: %d %s", r, status, body)
		}
	}
}

// validate checks v against an OpenAPI schema object.
func (s *spec) validate(schema map[string]any, v any, at string) []string {
	if ref, ok := schema["$ref"].(string); ok {
		name := strings.TrimPrefix(ref, "#/components/schemas/")
		sub, ok := s.Components.Schemas[name]
		if !ok {
			return []string{at + ": unknown $ref " + ref}
		}
		return s.validate(sub, v, at)
	}
	var errs []string
	typ, _ := schema["type"].(string)
	switch typ {
	case "object":
		obj, ok := v.(map[string]any)
		if !ok {
			return []string{fmt.Sprintf("%s: want an object, got %T", at, v)}
		}
		props, _ := schema["properties"].(map[string]any)
		for _, r := range asStrings(schema["required"]) {
			if _, ok := obj[r]; !ok {
				errs = append(errs, fmt.Sprintf("%s: required field %q missing", at, r))
			}
		}
		for k, val := range obj {
			ps, ok := props[k].(map[string]any)
			if !ok {
				if ap, isBool := schema["additionalProperties"].(bool); isBool && !ap {
					errs = append(errs, fmt.Sprintf("%s: field %q is not in the spec", at, k))
				}
				continue
			}
			errs = append(errs, s.validate(ps, val, at+"."+k)...)
		}
	case "array":
		arr, ok := v.([]any)
		if !ok {
			return []string{fmt.Sprintf("%s: want an array, got %T", at, v)}
		}
		items, _ := schema["items"].(map[string]any)
		for i, it := range arr {
			errs = append(errs, s.validate(items, it, fmt.Sprintf("%s[%d]", at, i))...)
		}
	case "string":
		str, ok := v.(string)
		if !ok {
			return []string{fmt.Sprintf("%s: want a string, got %T", at, v)}
		}
		if enum := asStrings(schema["enum"]); len(enum) > 0 && !slices.Contains(enum, str) {
			errs = append(errs, fmt.Sprintf("%s: %q is not one of %v", at, str, enum))
		}
		if p, ok := schema["pattern"].(string); ok && !regexp.MustCompile(p).MatchString(str) {
			errs = append(errs, fmt.Sprintf("%s: %q does not match %s", at, str, p))
		}
	case "integer":
		n, ok := v.(float64)
		if !ok || n != float64(int64(n)) {
			errs = append(errs, fmt.Sprintf("%s: want an integer, got %v", at, v))
		}
	case "number":
		if _, ok := v.(float64); !ok {
			errs = append(errs, fmt.Sprintf("%s: want a number, got %T", at, v))
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			errs = append(errs, fmt.Sprintf("%s: want a boolean, got %T", at, v))
		}
	}
	return errs
}

func asStrings(v any) []string {
	l, _ := v.([]any)
	var out []string
	for _, x := range l {
		if s, ok := x.(string); ok {
			out = append(out, s)
		}
	}
	return out
}

// responseSchema is the JSON schema the spec gives route's answer of
// status (or its default).
func (s *spec) responseSchema(t *testing.T, route string, status int) map[string]any {
	m, p, _ := strings.Cut(route, " ")
	var op struct {
		Responses map[string]map[string]any `json:"responses"`
	}
	raw, ok := s.Paths[p][strings.ToLower(m)]
	if !ok {
		t.Fatalf("%s is not in the spec", route)
	}
	json.Unmarshal(raw, &op)
	r, ok := op.Responses[fmt.Sprint(status)]
	if !ok {
		r, ok = op.Responses["default"]
	}
	if !ok {
		t.Fatalf("%s: the spec has no response for %d", route, status)
	}
	if ref, ok := r["$ref"].(string); ok {
		r = s.Components.Responses[strings.TrimPrefix(ref, "#/components/responses/")]
	}
	content, _ := r["content"].(map[string]any)
	js, _ := content["application/json"].(map[string]any)
	schema, _ := js["schema"].(map[string]any)
	if schema == nil {
		t.Fatalf("%s %d: no application/json schema", route, status)
	}
	return schema
}

func TestOpenAPIResponses(t *testing.T) {
	s := loadSpec(t)
	ctx := context.Background()
	f := newTestFleet(t, "tok")
	a, b := f.daemon("host-a"), f.daemon("host-b")
	checked := map[string]bool{}
	check := func(route, path, body string, wantStatus int) string {
		t.Helper()
		m, _, _ := strings.Cut(route, " ")
		status, resp := a.call(m, path, "tok", body, "Content-Type", "application/json")
		if status != wantStatus {
			t.Fatalf("%s %s: %d %s, want %d", route, path, status, resp, wantStatus)
		}
		var v any
		if err := json.Unmarshal([]byte(resp), &v); err != nil {
			t.Fatalf("%s: not JSON: %s", route, resp)
		}
		for _, e := range s.validate(s.responseSchema(t, route, status), v, route) {
			t.Error(e)
		}
		checked[route] = true
		return resp
	}
	check("GET /healthz", "/healthz", "", 200)
	check("GET /readyz", "/readyz", "", 200)
	check("POST /v1/agents", "/v1/agents", `{"name":"ag","backend":"sim","memory_mib":64}`, 201)
	check("POST /v1/agents", "/v1/agents", `{"name":"ag","backend":"sim"}`, 409)
	check("GET /v1/agents", "/v1/agents", "", 200)
	check("GET /v1/agents/{name}", "/v1/agents/ag", "", 200)
	check("GET /v1/agents/{name}", "/v1/agents/nobody", "", 404)
	check("POST /v1/agents/{name}/exec", "/v1/agents/ag/exec", `{"cmd":"set","args":["k","v"]}`, 200)
	check("POST /v1/agents/{name}/pause", "/v1/agents/ag/pause", "", 200)
	check("POST /v1/agents/{name}/resume", "/v1/agents/ag/resume", "", 200)
	check("GET /v1/hosts", "/v1/hosts", "", 200)
	check("GET /v1/vms", "/v1/vms", "", 200)
	out := check("POST /v1/teleport/out", "/v1/teleport/out", `{"name":"ag","keep_source":true,"agent_id":"ag-copy"}`, 200)
	var o server.OutResult
	json.Unmarshal([]byte(out), &o)
	check("GET /v1/packages", "/v1/packages", "", 200)
	check("GET /v1/packages/{id}", "/v1/packages/"+o.Package.ID, "", 200)
	check("POST /v1/packages/{id}/verify", "/v1/packages/"+o.Package.ID+"/verify", "", 200)
	check("POST /v1/teleport/in", "/v1/teleport/in", `{"package":"`+o.Package.ID+`"}`, 200)
	check("POST /v1/teleport/in", "/v1/teleport/in", `{"package":"`+o.Package.ID+`"}`, 409)
	check("POST /v1/agents/{name}/move", "/v1/agents/ag/move", `{"to":"host-b"}`, 200)
	check("POST /v1/agents/{name}/claim", "/v1/agents/ag/claim", `{}`, 409)
	check("POST /v1/agents/{name}/stop", "/v1/agents/ag-copy/stop", "", 200)
	check("DELETE /v1/agents/{name}", "/v1/agents/ag-copy", "", 200)
	check("DELETE /v1/packages/{id}", "/v1/packages/"+o.Package.ID, "", 200)
	if _, err := b.c.Agent(ctx, "ag"); err != nil {
		t.Fatal(err)
	}
	// The streamed answer: every line is an Event.
	status, body := a.call("POST", "/v1/agents/ag/claim", "tok", "{}", "Accept", "application/x-ndjson")
	if status != 200 {
		t.Fatalf("streamed claim: %d %s", status, body)
	}
	evSchema := s.Components.Schemas["Event"]
	lines := strings.Split(strings.TrimSpace(body), "\n")
	for _, l := range lines {
		var v any
		json.Unmarshal([]byte(l), &v)
		for _, e := range s.validate(evSchema, v, "event") {
			t.Error(e)
		}
	}
	if !strings.Contains(lines[len(lines)-1], `"event":"error"`) {
		t.Errorf("a streamed refusal must end with an error event: %s", body)
	}
	for _, r := range a.srv.Routes() {
		if !checked[r] && r != "GET /metrics" && r != "GET /openapi.yaml" {
			t.Errorf("no response of %s was checked against the spec", r)
		}
	}
}
