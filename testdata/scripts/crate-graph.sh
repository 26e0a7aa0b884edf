#!/usr/bin/env bash
# crate-graph.sh
#
# Checks the `crate-graph` block of ARCHITECTURE.md (one line per workspace crate,
# `crate -> dep, dep` or `crate -> (none)`) against `cargo metadata`: the normal
# dependencies (not dev- or build-dependencies) between workspace members. On a mismatch
# prints the edges found only in the doc and only in the Cargo.toml files, the block as it
# should read, and exits 1. `ARCHITECTURE=PATH` checks another file (for testing the check).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

doc="${ARCHITECTURE:-$REPO_DIR/ARCHITECTURE.md}"
[ -f "$doc" ] || die "$doc does not exist"
need python3 python3

work=$(mktemp -d /tmp/esgz-crate-graph.XXXXXX)
trap 'rm -rf "$work"' EXIT
(cd "$REPO_DIR" && "${CARGO:-cargo}" metadata --format-version 1 --no-deps) > "$work/metadata.json" \
    || die "cargo metadata failed"

python3 - "$work/metadata.json" "$doc" <<'PY'
import json
import re
import sys

meta_path, doc_path = sys.argv[1], sys.argv[2]

def fail(msg):
    print(f"not ok - {doc_path}: {msg}", file=sys.stderr)
    sys.exit(1)

# The graph cargo sees: workspace members and their normal dependencies on each other.
with open(meta_path) as f:
    meta = json.load(f)
members = set(meta["workspace_members"])
pkgs = [p for p in meta["packages"] if p["id"] in members]
names = {p["name"] for p in pkgs}
actual = {}
for p in pkgs:
    actual[p["name"]] = {
        d["name"]
        for d in p["dependencies"]
        if d.get("kind") is None and d["name"] in names and d.get("source") is None
    }

def render(graph):
    return "\n".join(
        f"{c} -> {', '.join(sorted(graph[c])) if graph[c] else '(none)'}" for c in sorted(graph)
    )

# The graph the doc claims: the one ```crate-graph fenced block.
with open(doc_path) as f:
    lines = f.read().split("\n")
starts = [i for i, l in enumerate(lines) if l.strip() == "```crate-graph"]
if not starts:
    fail("no ```crate-graph block found; add this one to the section \"Crates, following the data flow\":\n"
         "```crate-graph\n" + render(actual) + "\n```")
if len(starts) > 1:
    fail(f"{len(starts)} ```crate-graph blocks (lines {', '.join(str(i + 1) for i in starts)}); keep one")
body = []
for i in range(starts[0] + 1, len(lines)):
    if lines[i].strip() == "```":
        break
    body.append((i + 1, lines[i]))
else:
    fail(f"the ```crate-graph block at line {starts[0] + 1} is not closed")

line_re = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*->\s*(.*?)\s*$")
documented = {}
errors = []
for lineno, text in body:
    if not text.strip():
        continue
    m = line_re.match(text)
    if not m:
        errors.append(f"line {lineno}: cannot parse {text!r} (want `crate -> dep, dep` or `crate -> (none)`)")
        continue
    crate, rhs = m.group(1), m.group(2)
    if crate in documented:
        errors.append(f"line {lineno}: {crate} is listed twice")
        continue
    if rhs == "(none)":
        deps = []
    else:
        deps = [d.strip() for d in rhs.split(",")]
        if any(not re.fullmatch(r"[A-Za-z0-9_-]+", d) for d in deps):
            errors.append(f"line {lineno}: cannot parse the dependencies {rhs!r}")
            continue
        if deps != sorted(set(deps)):
            errors.append(f"line {lineno}: dependencies of {crate} are not sorted or repeat one")
    documented[crate] = set(deps)
if not documented and not errors:
    errors.append("the crate-graph block is empty")

problems = list(errors)
for c in sorted(set(documented) - set(actual)):
    problems.append(f"crate {c} is in ARCHITECTURE.md but is not a workspace member")
for c in sorted(set(actual) - set(documented)):
    problems.append(f"workspace crate {c} is missing from ARCHITECTURE.md")
edges = lambda g: {(c, d) for c in g for d in g[c]}
doc_edges, cargo_edges = edges(documented), edges(actual)
only_doc = sorted(doc_edges - cargo_edges)
only_cargo = sorted(cargo_edges - doc_edges)
if only_doc:
    problems.append("in ARCHITECTURE.md but not in Cargo.toml (no such normal dependency):\n"
                    + "\n".join(f"    - {a} -> {b}" for a, b in only_doc))
if only_cargo:
    problems.append("in Cargo.toml but not in ARCHITECTURE.md:\n"
                    + "\n".join(f"    + {a} -> {b}" for a, b in only_cargo))

if problems:
    print(f"not ok - {doc_path}: crate graph does not match cargo metadata", file=sys.stderr)
    for p in problems:
        print("  " + p, file=sys.stderr)
    print("the block should read:\n```crate-graph\n" + render(actual) + "\n```", file=sys.stderr)
    sys.exit(1)
print("ok - ARCHITECTURE.md crate graph matches cargo metadata")
PY
