#!/usr/bin/env python3
"""Fails if modules of one level import each other in a circle.

For each directory given, its modules (`x.rs` or `x/`) are the nodes; a module that
names a sibling (`crate::x::`, `super::x::`, or `x` inside `use crate::{…}` /
`use super::{…}`, outside comments and the trailing `#[cfg(test)]` module) has an
edge to it. Prints each circle and exits 1 if there is one.

    python3 scripts/module-cycles.py engine/src=crate admin/src=crate admin/src/site=super
"""
import os
import re
import sys


def module_texts(root):
    texts = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        module = name[:-3] if name.endswith(".rs") else name
        if module in ("lib", "main", "mod") or module.endswith("tests"):
            continue
        if os.path.isdir(path):
            files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".rs")]
        elif name.endswith(".rs"):
            files = [path]
        else:
            continue
        text = ""
        for file in files:
            if os.path.basename(file).endswith("tests.rs"):
                continue
            source = open(file, encoding="utf-8").read()
            cut = source.find("#[cfg(test)]")
            if cut >= 0:
                source = source[:cut]
            text += "\n".join(line for line in source.splitlines() if not line.strip().startswith("//"))
        texts[module] = texts.get(module, "") + text
    return texts


def edges(texts, prefix):
    graph = {module: set() for module in texts}
    for module, text in texts.items():
        named = set(re.findall(r"\b%s::(\w+)" % prefix, text))
        for group in re.findall(r"\b%s::\{([^}]*)\}" % prefix, text, re.S):
            named.update(re.findall(r"(\w+)", group))
        graph[module] = {other for other in named if other in texts and other != module}
    return graph


def circles(graph):
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(arguments):
    failed = False
    for argument in arguments:
        root, prefix = argument.split("=")
        graph = edges(module_texts(root), prefix)
        for component in circles(graph):
            failed = True
            links = ", ".join(f"{m} → {' '.join(sorted(graph[m] & set(component)))}" for m in component)
            print(f"{root}: modules import each other in a circle: {links}")
    if not failed:
        print("no import circles in " + " ".join(a.split("=")[0] for a in arguments))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
