// helm_template renders a Helm chart's templates offline with Go's
// text/template, the engine Helm itself uses, and the few Sprig functions
// otelbpf's chart calls. Helm cannot be installed where the tests run; this
// catches what `helm template` would: template syntax, unknown values
// (missingkey=error, stricter than Helm), and output that is not YAML.
//
// usage: helm_template CHART_DIR CONTEXT_JSON
// CONTEXT_JSON holds {"Values":..., "Chart":..., "Release":...}, built by the
// caller from Chart.yaml, values.yaml and overrides (Go has no YAML parser).
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"text/template"
)

func empty(v interface{}) bool {
	if v == nil {
		return true
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.String, reflect.Map, reflect.Slice:
		return rv.Len() == 0
	case reflect.Bool:
		return !rv.Bool()
	}
	if n, ok := v.(json.Number); ok {
		return n.String() == "0"
	}
	return false
}

func scalar(v interface{}) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case string:
		b, _ := json.Marshal(x)
		return string(b)
	case json.Number:
		return x.String()
	case bool:
		return fmt.Sprint(x)
	}
	return fmt.Sprint(v)
}

var bareKey = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_./-]*$`)

func key(k string) string {
	if bareKey.MatchString(k) && !yamlWords[strings.ToLower(k)] {
		return k
	}
	return scalar(k)
}

var yamlWords = map[string]bool{"true": true, "false": true, "yes": true, "no": true, "on": true, "off": true,
	"null": true, "y": true, "n": true}

// toYaml writes block-style YAML with sorted keys and JSON-quoted strings.
func toYaml(v interface{}) string {
	var b strings.Builder
	writeYaml(&b, v, 0)
	return strings.TrimSuffix(b.String(), "\n")
}

func writeYaml(b *strings.Builder, v interface{}, indent int) {
	pad := strings.Repeat(" ", indent)
	switch x := v.(type) {
	case map[string]interface{}:
		if len(x) == 0 {
			b.WriteString(pad + "{}\n")
			return
		}
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			writeEntry(b, pad+key(k)+":", x[k], indent)
		}
	case []interface{}:
		if len(x) == 0 {
			b.WriteString(pad + "[]\n")
			return
		}
		for _, item := range x {
			if m, ok := item.(map[string]interface{}); ok && len(m) > 0 {
				// "- key: v" with the map's other keys under the first
				var sub strings.Builder
				writeYaml(&sub, m, indent+2)
				b.WriteString(pad + "- " + sub.String()[indent+2:])
				continue
			}
			writeEntry(b, pad+"-", item, indent)
		}
	default:
		b.WriteString(pad + scalar(v) + "\n")
	}
}

func writeEntry(b *strings.Builder, head string, v interface{}, indent int) {
	switch x := v.(type) {
	case map[string]interface{}:
		if len(x) == 0 {
			b.WriteString(head + " {}\n")
			return
		}
		b.WriteString(head + "\n")
		writeYaml(b, x, indent+2)
	case []interface{}:
		if len(x) == 0 {
			b.WriteString(head + " []\n")
			return
		}
		b.WriteString(head + "\n")
		writeYaml(b, x, indent+2)
	default:
		b.WriteString(head + " " + scalar(v) + "\n")
	}
}

func indent(n int, s string) string {
	pad := strings.Repeat(" ", n)
	return pad + strings.ReplaceAll(s, "\n", "\n"+pad)
}

// merge copies keys of the sources into dst where dst has none (Sprig's
// precedence: the destination wins), recursing into maps.
func merge(dst map[string]interface{}, srcs ...map[string]interface{}) map[string]interface{} {
	for _, src := range srcs {
		for k, sv := range src {
			dv, ok := dst[k]
			if !ok {
				dst[k] = sv
				continue
			}
			dm, dok := dv.(map[string]interface{})
			sm, sok := sv.(map[string]interface{})
			if dok && sok {
				merge(dm, sm)
			}
		}
	}
	return dst
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: helm_template CHART_DIR CONTEXT_JSON")
		os.Exit(2)
	}
	chart := os.Args[1]
	dec := json.NewDecoder(strings.NewReader(os.Args[2]))
	dec.UseNumber()
	var ctx map[string]interface{}
	if err := dec.Decode(&ctx); err != nil {
		fmt.Fprintln(os.Stderr, "context:", err)
		os.Exit(2)
	}
	root := template.New("chart").Option("missingkey=error")
	funcs := template.FuncMap{
		"include": func(name string, data interface{}) (string, error) {
			var buf bytes.Buffer
			err := root.ExecuteTemplate(&buf, name, data)
			return buf.String(), err
		},
		"toYaml":  toYaml,
		"nindent": func(n int, s string) string { return "\n" + indent(n, s) },
		"indent":  indent,
		"quote":   func(v interface{}) string { b, _ := json.Marshal(fmt.Sprint(v)); return string(b) },
		"default": func(d interface{}, given ...interface{}) interface{} {
			if len(given) == 0 || empty(given[0]) {
				return d
			}
			return given[0]
		},
		"trunc": func(n int, s string) string {
			if len(s) > n {
				return s[:n]
			}
			return s
		},
		"trimSuffix": func(suffix, s string) string { return strings.TrimSuffix(s, suffix) },
		"contains":   func(sub, s string) bool { return strings.Contains(s, sub) },
		"dict": func(kv ...interface{}) map[string]interface{} {
			m := map[string]interface{}{}
			for i := 0; i+1 < len(kv); i += 2 {
				m[fmt.Sprint(kv[i])] = kv[i+1]
			}
			return m
		},
		"merge": merge,
		"sha256sum": func(s string) string {
			h := sha256.Sum256([]byte(s))
			return hex.EncodeToString(h[:])
		},
	}
	root.Funcs(funcs)
	files, _ := filepath.Glob(filepath.Join(chart, "templates", "*"))
	sort.Strings(files)
	var rendered []string
	for _, f := range files {
		text, err := os.ReadFile(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		name := filepath.Base(f)
		if _, err := root.New(name).Parse(string(text)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if strings.HasSuffix(name, ".yaml") {
			rendered = append(rendered, name)
		}
	}
	for _, name := range rendered {
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, ctx); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Printf("---\n# Source: %s/templates/%s\n%s\n", filepath.Base(chart), name, buf.String())
	}
}
