package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"

	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"
)

// DefaultConfig is the agent's config file. The agent reads it when it exists; --config names
// another one (which must exist), --config "" reads none.
const DefaultConfig = "/etc/kata-dp/config.yaml"

// The config file is a YAML mapping whose keys are the agent's flag names (socket, state-dir,
// log-level, ...) with scalar values, so every flag is settable there and one name means one
// thing everywhere. A flag given on the command line overrides the file. Unknown keys, repeated
// keys, non-scalar values and values a flag or its check refuses are errors that name the
// file, the line and the key: an agent started with a typo in its config must not run with a
// default the operator did not choose.

// configSource says where an effective value came from (--print-config shows it).
type configSource string

const (
	fromDefault configSource = "default"
	fromFile    configSource = "file"
	fromFlag    configSource = "flag"
)

// notInConfig are agent flags that make no sense in the file.
var notInConfig = map[string]bool{"config": true, "print-config": true, "help": true}

// loadConfig applies the config file at path to the flags of fs that were not given on the
// command line, checking each value with check (by flag name) too. It returns where each
// flag's value came from. required says the file was named explicitly (a missing default file
// is no error).
func loadConfig(fs *pflag.FlagSet, path string, required bool, check map[string]func(string) error) (map[string]configSource, error) {
	src := map[string]configSource{}
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed {
			src[f.Name] = fromFlag
		} else {
			src[f.Name] = fromDefault
		}
	})
	if path == "" {
		return src, nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && !required {
		return src, nil
	}
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return src, nil // empty file: all defaults
		}
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
		return src, nil // only comments
	}
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("config %s:%d: want a mapping of option: value", path, root.Line)
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		key := k.Value
		where := fmt.Sprintf("config %s:%d: %s", path, k.Line, key)
		f := fs.Lookup(key)
		if k.Kind != yaml.ScalarNode || f == nil || notInConfig[key] {
			return nil, fmt.Errorf("%s: unknown key (the keys are the agent's flags: kata-dp agent --help)", where)
		}
		if line, dup := seen[key]; dup {
			return nil, fmt.Errorf("%s: repeated (first on line %d)", where, line)
		}
		seen[key] = k.Line
		if v.Kind != yaml.ScalarNode || v.Tag == "!!null" {
			return nil, fmt.Errorf("%s: want a single value", where)
		}
		if f.Changed {
			continue // the command line wins; its value was checked as a flag
		}
		if err := fs.Set(key, v.Value); err != nil {
			return nil, fmt.Errorf("%s: %q: %w", where, v.Value, err)
		}
		if c := check[key]; c != nil {
			if err := c(v.Value); err != nil {
				return nil, fmt.Errorf("%s: %q: %w", where, v.Value, err)
			}
		}
		src[key] = fromFile
	}
	return src, nil
}

// printConfig writes the effective values of fs as a config file (YAML), each with where it
// came from as a comment, so the output can be saved as the config file.
func printConfig(w io.Writer, fs *pflag.FlagSet, src map[string]configSource, path string) error {
	m := &yaml.Node{Kind: yaml.MappingNode}
	var err error
	fs.VisitAll(func(f *pflag.Flag) {
		if notInConfig[f.Name] || err != nil {
			return
		}
		v := &yaml.Node{Kind: yaml.ScalarNode, Value: f.Value.String(), LineComment: string(src[f.Name])}
		if f.Value.Type() == "bool" {
			v.Tag = "!!bool"
		} else {
			v.Tag = "!!str"
		}
		m.Content = append(m.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: f.Name}, v)
	})
	doc := &yaml.Node{Kind: yaml.DocumentNode, HeadComment: "effective kata-dp agent configuration (config file: " + orNone(path) + ")",
		Content: []*yaml.Node{m}}
	enc := yaml.NewEncoder(w)
	enc.SetIndent(2)
	if err := enc.Encode(doc); err != nil {
		return err
	}
	return enc.Close()
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// agentChecks are the value checks of the agent's options beyond their flag types, applied to
// flags and file values alike.
var agentChecks = map[string]func(string) error{
	"socket":     absPath,
	"state-dir":  absPath,
	"bpffs-root": absPath,
	"kata-dir": func(s string) error {
		if s == "" {
			return nil
		}
		return absPath(s)
	},
	"kubeconfig": func(s string) error {
		if s == "" {
			return nil
		}
		return absPath(s)
	},
	"cluster-max-rules": func(s string) error {
		if n, err := strconv.Atoi(s); err != nil || n < 1 {
			return errors.New("want a positive number of rules")
		}
		return nil
	},
	"log-level": func(s string) error {
		var l slog.Level
		return l.UnmarshalText([]byte(s))
	},
	"log-format": func(s string) error {
		if s != "text" && s != "json" {
			return errors.New("want text or json")
		}
		return nil
	},
	"metrics-addr": func(s string) error {
		if s == "" {
			return nil
		}
		_, port, err := net.SplitHostPort(s)
		if err != nil {
			return err
		}
		if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
			return fmt.Errorf("port %q: want 0-65535", port)
		}
		return nil
	},
}

func absPath(s string) error {
	if !filepath.IsAbs(s) {
		return errors.New("want an absolute path")
	}
	return nil
}
