"""The module import graph of lmjax, its cycles, imports inside functions, and
the longest functions; prints JSON.

    python tools/import_graph.py [--longest 10]

An lmjax import inside a function counts as explained when its line carries a
comment saying why (e.g. keeping TensorFlow out of a path).
"""

import argparse
import ast
import json
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'lmjax'


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_modules(node, modules: set) -> list[str]:
  """The lmjax modules an Import / ImportFrom node names."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in modules]
  if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('lmjax'):
    found = []
    for alias in node.names:
      candidate = f'{node.module}.{alias.name}'
      found.append(candidate if candidate in modules else node.module)
    return [m for m in found if m in modules]
  return []


def analyse(longest: int = 10) -> dict:
  files = sorted(PACKAGE.rglob('*.py'))
  modules = {module_name(p) for p in files}
  graph, inside, lengths = {}, [], []
  for path in files:
    name = module_name(path)
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    top = set()
    for node in tree.body:
      top.update(imported_modules(node, modules))
    graph[name] = sorted(top - {name})
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lengths.append((node.end_lineno - node.lineno + 1, f'{name}.{node.name}'))
        for inner in ast.walk(node):
          for target in imported_modules(inner, modules):
            line = lines[inner.lineno - 1]
            inside.append(
              {'module': name, 'line': inner.lineno, 'imports': target, 'explained': '#' in line}
            )
  return {
    'graph': graph,
    'cycles': cycles(graph),
    'imports_inside_functions': inside,
    'longest_functions': [
      {'lines': n, 'function': f} for n, f in sorted(lengths, reverse=True)[:longest]
    ],
  }


def cycles(graph: dict) -> list[list[str]]:
  """Every cycle found by a depth-first search (each reported once, from its first module)."""
  found, state = [], {}

  def visit(node, stack):
    state[node] = 'open'
    stack.append(node)
    for nxt in graph.get(node, []):
      if state.get(nxt) == 'open':
        found.append(stack[stack.index(nxt) :] + [nxt])
      elif nxt not in state:
        visit(nxt, stack)
    stack.pop()
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node, [])
  return found


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--longest', type=int, default=10)
  print(json.dumps(analyse(parser.parse_args().longest), indent=1))


if __name__ == '__main__':
  main()
