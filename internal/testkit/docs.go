package testkit

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"unicode"
)

// DocBlock is one fenced code block of a page of the documentation.
type DocBlock struct {
	Page    string // relative to the repository's root: "README.md", "docs/spool.md"
	Line    int    // of the opening fence, 1-based
	Lang    string // the fence's info string: "caddy", "sh", "text", ...
	Example string // the name of the `<!-- example: NAME -->` line right above it, if any
	Text    string // the block's content, ending in a newline
}

// exampleMarker is the line that names the block after it; tests find an
// example by that name, never by its position or its content.
var exampleMarker = regexp.MustCompile(`^<!-- example: ([a-z0-9-]+) -->$`)

// Root is the repository's root directory.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// DocPages lists the documentation's pages: the README and docs/*.md.
func DocPages() ([]string, error) {
	pages, err := filepath.Glob(filepath.Join(Root(), "docs", "*.md"))
	if err != nil {
		return nil, err
	}
	out := []string{"README.md"}
	for _, p := range pages {
		out = append(out, filepath.ToSlash(filepath.Join("docs", filepath.Base(p))))
	}
	return out, nil
}

// DocBlocks reads the fenced code blocks of a page.
func DocBlocks(page string) ([]DocBlock, error) {
	f, err := os.Open(filepath.Join(Root(), page))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var (
		blocks  []DocBlock
		cur     *DocBlock
		indent  string // the opening fence's
		example string
		line    int
	)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line++
		text := sc.Text()
		trimmed := strings.TrimLeft(text, " ")
		if cur != nil {
			if strings.TrimSpace(text) == "```" {
				blocks = append(blocks, *cur)
				cur = nil
				continue
			}
			// A block in a list is indented as its fence is.
			cur.Text += strings.TrimPrefix(text, indent) + "\n"
			continue
		}
		if m := exampleMarker.FindStringSubmatch(strings.TrimSpace(text)); m != nil {
			example = m[1]
			continue
		}
		if strings.HasPrefix(trimmed, "```") {
			indent = text[:len(text)-len(trimmed)]
			cur = &DocBlock{Page: page, Line: line, Lang: strings.TrimSpace(strings.TrimPrefix(trimmed, "```")), Example: example}
			example = ""
			continue
		}
		if strings.TrimSpace(text) != "" {
			example = "" // a marker names only the block right after it
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if cur != nil {
		return nil, fmt.Errorf("%s:%d: a code block is never closed", page, cur.Line)
	}
	return blocks, nil
}

// Example returns the block named name (`<!-- example: NAME -->` right above
// it) on page, so that a test runs the documentation's example as it is
// written. A name that is not there fails the test: an example renamed or
// removed must take its test with it.
func Example(t interface {
	Helper()
	Fatalf(string, ...any)
}, page, name string) string {
	t.Helper()
	blocks, err := DocBlocks(page)
	if err != nil {
		t.Fatalf("%v", err)
	}
	for _, b := range blocks {
		if b.Example == name {
			return b.Text
		}
	}
	t.Fatalf("%s has no example named %q (a `<!-- example: %s -->` line right above its code block)", page, name, name)
	return ""
}

// HeadingAnchors lists the anchors GitHub makes of a page's headings:
// lowercase, spaces to '-', other punctuation dropped, and a repeated
// anchor suffixed -1, -2, ...
func HeadingAnchors(page string) (map[string]bool, error) {
	raw, err := os.ReadFile(filepath.Join(Root(), page))
	if err != nil {
		return nil, err
	}
	anchors := map[string]bool{}
	seen := map[string]int{}
	fenced := false
	for _, line := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			fenced = !fenced
			continue
		}
		text, ok := strings.CutPrefix(line, "#")
		if fenced || !ok {
			continue
		}
		text = strings.TrimLeft(text, "#")
		if text == "" || text[0] != ' ' {
			continue
		}
		var b strings.Builder
		for _, r := range strings.ToLower(strings.TrimSpace(text)) {
			switch {
			case r == ' ':
				b.WriteRune('-')
			case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r) || unicode.Is(unicode.Mn, r):
				b.WriteRune(r)
			}
		}
		anchor := b.String()
		if n := seen[anchor]; n > 0 {
			anchors[fmt.Sprintf("%s-%d", anchor, n)] = true
		} else {
			anchors[anchor] = true
		}
		seen[anchor]++
	}
	return anchors, nil
}
