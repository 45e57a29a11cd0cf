"""Which of flax's tests use BatchNorm: a rule over the test file's syntax tree.

A test is selected when the code it runs, as far as one file shows it, names `BatchNorm`
(an identifier `BatchNorm` or an attribute `.BatchNorm`: `nn.BatchNorm`, `nnx.BatchNorm`,
`nn.normalization.BatchNorm`, ...; a string or a comment saying "BatchNorm" does not count).
"The code it runs" is the closure, within the test's own file, of:
  - the test function itself, with its decorators (parameter lists often hold the class),
  - for a test method: its class's `setUp`/`setUpClass` and class-level statements,
  - every module-level function, class or assignment the code above names (transitively),
  - every member of the test's class (or of its base classes defined in the file) that the
    code reaches through `self.`/`cls.` (transitively).
Code imported from another file is not followed: flax's tests build their models in the
test file itself.
"""

from __future__ import annotations

import ast
import functools

TARGET = "BatchNorm"


def _names_used(node):
    """(plain names, attribute names read through self/cls) referenced anywhere under node."""
    names, self_attrs = set(), set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in ("self", "cls"):
            self_attrs.add(sub.attr)
    return names, self_attrs


def _mentions_target(node):
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id == TARGET:
            return True
        if isinstance(sub, ast.Attribute) and sub.attr == TARGET:
            return True
    return False


def _defined_names(stmt):
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


class FileIndex:
    """The syntax tree of one test file, indexed for `uses_target`."""

    def __init__(self, source: str):
        tree = ast.parse(source)
        self.module_defs: dict[str, list[ast.AST]] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        for stmt in tree.body:
            for name in _defined_names(stmt):
                self.module_defs.setdefault(name, []).append(stmt)
            if isinstance(stmt, ast.ClassDef):
                self.classes[stmt.name] = stmt
        # Every function definition (at any depth) by the lines it starts on, so that a
        # collected test's code object (co_firstlineno: first decorator, or `def`) finds it.
        self.by_line: dict[int, tuple[ast.AST, ast.ClassDef | None]] = {}
        for stmt in tree.body:
            if isinstance(stmt, ast.ClassDef):
                for member in stmt.body:
                    if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self._index_def(member, stmt)
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._index_def(stmt, None)

    def _index_def(self, node, cls):
        lines = {node.lineno} | {d.lineno for d in node.decorator_list}
        for line in lines:
            self.by_line[line] = (node, cls)

    def _class_members(self, cls: ast.ClassDef, seen=None) -> dict[str, list[ast.AST]]:
        """Members of cls and of its base classes defined in this file (cls's own win)."""
        seen = seen or set()
        if cls.name in seen:
            return {}
        seen.add(cls.name)
        members: dict[str, list[ast.AST]] = {}
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in self.classes:
                members.update(self._class_members(self.classes[base.id], seen))
        for stmt in cls.body:
            for name in _defined_names(stmt):
                members[name] = [stmt]
        return members

    def uses_target(self, func: ast.AST, cls: ast.ClassDef | None) -> bool:
        members = self._class_members(cls) if cls is not None else {}
        todo = [func]
        if cls is not None:
            todo += [m for name in ("setUp", "setUpClass") for m in members.get(name, [])]
            todo += [s for s in cls.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        seen: set[int] = set()
        while todo:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if _mentions_target(node):
                return True
            names, self_attrs = _names_used(node)
            for name in names:
                todo += self.module_defs.get(name, [])
            for attr in self_attrs:
                todo += members.get(attr, [])
        return False


@functools.cache
def file_index(path: str) -> FileIndex:
    with open(path, encoding="utf-8") as f:
        return FileIndex(f.read())


def selected(function) -> bool | None:
    """True/False for a collected test function; None when its definition is not found."""
    import inspect

    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    try:
        index = file_index(code.co_filename)
    except (OSError, SyntaxError):
        return None
    found = index.by_line.get(code.co_firstlineno)
    if found is None:
        return None
    return index.uses_target(*found)
