package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/spf13/pflag"

	"github.com/vmexportfs/vmexportfs/backend/redact"
	"github.com/vmexportfs/vmexportfs/backend/xapi"
)

// The shells `vmexportfs completion` writes a script for.
var completionShells = []string{"bash", "zsh", "fish"}

// flagSpec is a flag as completion and the man page see it.
type flagSpec struct {
	long, short string
	usage       string   // the whole usage text
	value       string   // the value's name; "" for a flag without one
	def         string   // the default worth showing, or ""
	choices     []string // the values it takes, when a closed set
	files       bool     // the value is a path
}

// commandSpec is a command with its flags, those of the mount split into
// the common ones and each platform's.
type commandSpec struct {
	command
	flags    []flagSpec
	sections []flagSection // the mount's platform flags; empty elsewhere
}

type flagSection struct {
	title string
	flags []flagSpec
}

// specs describes every command from its flag definitions, adding the
// flags the commands take without defining them (--help, and -V for the
// command without a name).
func specs() []commandSpec {
	var out []commandSpec
	for _, c := range commands() {
		cs := commandSpec{command: c}
		f := c.flags()
		if c.name == "mount" {
			var cfg mountConfig
			newMountFlags(&cfg, new(string), new([]string), platforms())
			own := map[string]bool{}
			for _, p := range cfg.platforms {
				sec := flagSection{title: "Flags of " + p.Scheme + "+ sources"}
				p.flags.VisitAll(func(fl *pflag.Flag) {
					own[fl.Name] = true
					sec.flags = append(sec.flags, newFlagSpec(fl))
				})
				if len(sec.flags) > 0 {
					cs.sections = append(cs.sections, sec)
				}
			}
			common := commonMountFlags(&mountConfig{}, new(string), new([]string))
			describeDataDefaults(common, "/var/lib/vmexportfs as root, else $XDG_STATE_HOME/vmexportfs or ~/.local/state/vmexportfs",
				"/var/cache/vmexportfs as root, else $XDG_CACHE_HOME/vmexportfs or ~/.cache/vmexportfs",
				"STATE-DIR/"+sourceDirPattern+"/"+logFileName)
			f = common
		}
		f.VisitAll(func(fl *pflag.Flag) {
			if !fl.Hidden {
				cs.flags = append(cs.flags, newFlagSpec(fl))
			}
		})
		cs.flags = append(cs.flags, flagSpec{long: "help", short: "h", usage: "print this command's help"})
		if c.name == "mount" {
			cs.flags = append(cs.flags, flagSpec{long: "version", short: "V", usage: "print the version"})
		}
		out = append(out, cs)
	}
	return out
}

func newFlagSpec(fl *pflag.Flag) flagSpec {
	value, usage := pflag.UnquoteUsage(fl)
	s := flagSpec{long: fl.Name, short: fl.Shorthand, usage: usage, choices: flagChoices(fl.Name)}
	if fl.NoOptDefVal == "" { // a boolean's is "true"
		s.value = value
		s.files = strings.HasSuffix(fl.Name, "-file") || strings.HasSuffix(fl.Name, "-dir") ||
			fl.Name == "kubeconfig" || fl.Name == "export-status"
	}
	switch fl.DefValue {
	case "", "false", "0", "0s", "[]":
	default:
		s.def = fl.DefValue
	}
	return s
}

// flagChoices are the values of the flags that take a closed set.
func flagChoices(name string) []string {
	switch name {
	case "log-level":
		return []string{"debug", "info", "warn", "error"}
	case "log-format":
		return []string{"text", "json"}
	case "platform":
		return demoPlatformNames()
	case "dataset":
		return slices.Sorted(maps.Keys(demoDatasets()))
	case "xapi-rmdir":
		return []string{string(xapi.RmdirDestroy), string(xapi.RmdirDataDestroy)}
	}
	return nil
}

// operandWords are the words a command's operands complete to; nil for
// files or nothing.
func operandWords(operands string) []string {
	switch operands {
	case operandCommands:
		return commandNames()
	case operandShells:
		return completionShells
	}
	return nil
}

// names are a flag's spellings on the command line.
func (s flagSpec) names() []string {
	n := []string{"--" + s.long}
	if s.short != "" {
		n = append([]string{"-" + s.short}, n...)
	}
	return n
}

// summary is the usage's first clause, for the shells' one-line lists.
func (s flagSpec) summary() string {
	u := s.usage
	if i := strings.Index(u, "; "); i > 0 {
		u = u[:i]
	}
	if i := strings.Index(u, " ("); i > 0 {
		u = u[:i]
	}
	return u
}

func runCompletion(_ context.Context, args []string, stdout, _ io.Writer, _ *redact.Secrets) error {
	operands, done, err := parseOperands("completion", args, stdout)
	switch {
	case err != nil || done:
		return err
	case len(operands) != 1 || !slices.Contains(completionShells, operands[0]):
		return fmt.Errorf("%w: completion: want one of %s", errUsage, strings.Join(completionShells, ", "))
	}
	var script string
	switch operands[0] {
	case "bash":
		script = bashCompletion(specs())
	case "zsh":
		script = zshCompletion(specs())
	case "fish":
		script = fishCompletion(specs())
	}
	_, err = io.WriteString(stdout, script)
	return err
}

// bashCompletion is a completion function that needs nothing but bash (not
// the bash-completion package). A word it has nothing to offer for (a path,
// a user name) falls back to bash's filename completion.
func bashCompletion(cs []commandSpec) string {
	var b strings.Builder
	b.WriteString(`# bash completion for vmexportfs, generated by "vmexportfs completion bash".
# Load it with: source <(vmexportfs completion bash)
_vmexportfs() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=
    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD-1]}
    # bash splits --flag=value at the "="
    if [[ $cur == = ]]; then
        cur=
    elif [[ $prev == = ]] && ((COMP_CWORD > 1)); then
        prev=${COMP_WORDS[COMP_CWORD-2]}
    fi
    local cmd=mount
    if ((COMP_CWORD > 1)); then
        case ${COMP_WORDS[1]} in
`)
	fmt.Fprintf(&b, "        %s) cmd=${COMP_WORDS[1]} ;;\n", strings.Join(commandNames(), "|"))
	b.WriteString("        esac\n    fi\n    case $cmd:$prev in\n")
	for _, c := range cs {
		for _, fl := range allFlags(c) {
			if fl.value == "" {
				continue
			}
			var pats []string
			for _, n := range fl.names() {
				pats = append(pats, c.name+":"+n)
			}
			action := "return ;; # a value of the user's own"
			switch {
			case len(fl.choices) > 0:
				action = fmt.Sprintf("mapfile -t COMPREPLY < <(compgen -W '%s' -- \"$cur\"); return ;;", strings.Join(fl.choices, " "))
			case fl.files:
				action = "mapfile -t COMPREPLY < <(compgen -f -- \"$cur\"); return ;;"
			}
			fmt.Fprintf(&b, "    %s) %s\n", strings.Join(pats, "|"), action)
		}
	}
	b.WriteString("    esac\n    if [[ $cur == -* ]]; then\n        case $cmd in\n")
	for _, c := range cs {
		var words []string
		for _, fl := range allFlags(c) {
			words = append(words, fl.names()...)
		}
		fmt.Fprintf(&b, "        %s) mapfile -t COMPREPLY < <(compgen -W '%s' -- \"$cur\") ;;\n", c.name, strings.Join(words, " "))
	}
	b.WriteString("        esac\n        return\n    fi\n")
	fmt.Fprintf(&b, "    if ((COMP_CWORD == 1)); then\n        mapfile -t COMPREPLY < <(compgen -W '%s' -- \"$cur\")\n        return\n    fi\n", strings.Join(commandNames(), " "))
	b.WriteString("    case $cmd in\n")
	for _, c := range cs {
		if words := operandWords(c.operands); words != nil {
			fmt.Fprintf(&b, "    %s) mapfile -t COMPREPLY < <(compgen -W '%s' -- \"$cur\") ;;\n", c.name, strings.Join(words, " "))
		}
	}
	b.WriteString("    esac\n}\ncomplete -o default -F _vmexportfs vmexportfs\n")
	return b.String()
}

// zshCompletion is a completion function for zsh's completion system: it
// works loaded from a directory of $fpath (as _vmexportfs) and sourced.
func zshCompletion(cs []commandSpec) string {
	var b strings.Builder
	b.WriteString(`#compdef vmexportfs
# zsh completion for vmexportfs, generated by "vmexportfs completion zsh".
# Load it with: source <(vmexportfs completion zsh), or save it as _vmexportfs in a directory of $fpath.
_vmexportfs() {
  local -a commands
  commands=(
`)
	for _, c := range cs {
		fmt.Fprintf(&b, "    %s\n", zshQuote(zshEscape(c.name)+":"+zshEscape(c.summary)))
	}
	b.WriteString(`  )
  if (( CURRENT == 2 )) && [[ $words[2] != -* ]]; then
    _describe -t commands command commands
    return
  fi
  local cmd=mount
  case $words[2] in
`)
	fmt.Fprintf(&b, "  (%s) cmd=$words[2]; shift words; (( CURRENT-- )) ;;\n", strings.Join(commandNames(), "|"))
	b.WriteString("  esac\n  case $cmd in\n")
	for _, c := range cs {
		fmt.Fprintf(&b, "  (%s)\n    _arguments -s -S", c.name)
		for _, fl := range allFlags(c) {
			for _, n := range fl.names() {
				spec := n
				if fl.value != "" {
					if strings.HasPrefix(n, "--") {
						spec += "="
					}
				}
				spec += "[" + zshEscape(fl.summary()) + "]"
				if fl.value != "" {
					action := " "
					switch {
					case len(fl.choices) > 0:
						action = "(" + strings.Join(fl.choices, " ") + ")"
					case fl.files:
						action = "_files"
					}
					spec += ":" + zshEscape(fl.value) + ":" + action
				}
				fmt.Fprintf(&b, " \\\n      %s", zshQuote(spec))
			}
		}
		switch {
		case operandWords(c.operands) != nil:
			fmt.Fprintf(&b, " \\\n      %s", zshQuote("*:"+c.operands+":("+strings.Join(operandWords(c.operands), " ")+")"))
		case c.operands == operandFiles:
			fmt.Fprintf(&b, " \\\n      %s", zshQuote("*:file:_files"))
		}
		b.WriteString("\n    ;;\n")
	}
	b.WriteString(`  esac
}
if [[ $funcstack[1] == _vmexportfs ]]; then
  _vmexportfs "$@"
else
  compdef _vmexportfs vmexportfs
fi
`)
	return b.String()
}

// zshEscape escapes what _arguments and _describe give a meaning to.
func zshEscape(s string) string {
	return strings.NewReplacer(`\`, `\\`, `[`, `\[`, `]`, `\]`, `:`, `\:`).Replace(s)
}

func zshQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// fishCompletion is a set of fish `complete` rules, one a flag.
func fishCompletion(cs []commandSpec) string {
	var b strings.Builder
	b.WriteString(`# fish completion for vmexportfs, generated by "vmexportfs completion fish".
# Load it with: vmexportfs completion fish | source, or save it as ~/.config/fish/completions/vmexportfs.fish
function __vmexportfs_command
    set -l words (commandline -opc)
`)
	fmt.Fprintf(&b, "    if test (count $words) -ge 2; and contains -- $words[2] %s\n", strings.Join(commandNames(), " "))
	b.WriteString(`        echo $words[2]
    else
        echo mount
    end
end
function __vmexportfs_first_word
    test (count (commandline -opc)) -eq 1
end
`)
	for _, c := range cs {
		fmt.Fprintf(&b, "complete -c vmexportfs -f -n __vmexportfs_first_word -a %s -d %s\n", c.name, fishQuote(c.summary))
	}
	for _, c := range cs {
		cond := fishQuote("test (__vmexportfs_command) = " + c.name)
		for _, fl := range allFlags(c) {
			line := "complete -c vmexportfs -n " + cond
			if fl.short != "" {
				line += " -s " + fl.short
			}
			line += " -l " + fl.long
			switch {
			case fl.value == "":
			case len(fl.choices) > 0:
				line += " -x -a " + fishQuote(strings.Join(fl.choices, " "))
			case fl.files:
				line += " -r -F"
			default:
				line += " -x"
			}
			fmt.Fprintf(&b, "%s -d %s\n", line, fishQuote(fl.summary()))
		}
		switch words := operandWords(c.operands); {
		case words != nil:
			fmt.Fprintf(&b, "complete -c vmexportfs -n %s -f -a %s\n", cond, fishQuote(strings.Join(words, " ")))
		case c.operands == operandNone:
			fmt.Fprintf(&b, "complete -c vmexportfs -n %s -f\n", cond)
		}
	}
	return b.String()
}

func fishQuote(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

// allFlags are a command's flags, its sections' included.
func allFlags(c commandSpec) []flagSpec {
	all := slices.Clone(c.flags)
	for _, sec := range c.sections {
		all = append(all, sec.flags...)
	}
	return all
}
