"""YAML read and written as experiment files need it.

PyYAML alone reads YAML 1.1 (``010`` is octal eight, ``no`` is false),
keeps the last of two equal keys silently and gives no line for a key of
the loaded data. Every message about an experiment must name the file and
line of the key at fault, and a value must read the same in a file, in a
``--set`` and in the config.yaml a run writes back. So the file and
``--set`` values go through one loader here (YAML 1.2 numbers and booleans,
no repeated key) that also maps each key path to its line. Walking every
key path, or checking every value of a ``--set``, expands aliases, so a
document past a node limit is refused before either. config.yaml is
written by a dumper that quotes whatever either reader would take for
something else, and writes every value out (no aliases).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import yaml

from sim.config import ConfigError

KeyPath = tuple[Any, ...]  # a key path: strings for mapping keys, ints for list items


_INT_TAG, _FLOAT_TAG, _BOOL_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
# YAML 1.2 core schema numbers. PyYAML implements YAML 1.1, which reads
# ``1e3`` as a string, ``010`` as octal 8 and ``1:00`` as sexagesimal 60: a
# rate or a count silently different from what was written.
_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
# Booleans too: YAML 1.1 also reads yes/no/on/off/y/n as booleans (a value
# ``no`` or ``off`` silently false); YAML 1.2 reads them as strings.
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _Constructor(yaml.constructor.SafeConstructor):
    """SafeConstructor with YAML 1.2 integers: ``010`` is ten, not octal eight."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = self.construct_scalar(node)
        try:
            if value.startswith(("0o", "0x")):
                return int(value[2:], 8 if value[1] == "o" else 16)
            return int(value, 10)
        except ValueError:
            # Past Python's digit limit for int() (no setting needs such a number), or not an integer
            # at all under an explicit tag (!!int 12a), which said "an integer of 3 digits is too long".
            problem = (f"an integer of {len(value)} digits is too long" if len(value) > sys.get_int_max_str_digits()
                       else f"expected an integer, got {value!r}")
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


_Constructor.add_constructor(_INT_TAG, _Constructor.construct_yaml_int)


_YAML11_RULES = yaml.resolver.Resolver.yaml_implicit_resolvers  # PyYAML's own table, left unchanged


class _Resolver(yaml.resolver.Resolver):
    """YAML 1.1's implicit types (null, timestamps), but numbers and booleans by the YAML 1.2 core schema.

    A copy of the resolver table, so yaml.SafeLoader itself is not changed.
    """

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in rules if tag not in (_INT_TAG, _FLOAT_TAG, _BOOL_TAG)]
        for first, rules in _YAML11_RULES.items()
    }


# An int before a float: ``10`` matches both, and the first rule wins.
_Resolver.add_implicit_resolver(_INT_TAG, _INT_RE, list("-+0123456789"))
_Resolver.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+.0123456789"))
_Resolver.add_implicit_resolver(_BOOL_TAG, _BOOL_RE, list("tTfF"))


class _Loader(
    yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, _Constructor, _Resolver
):
    """The one loader of experiment files and ``--set`` values, so both read a value alike."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Constructor.__init__(self)
        _Resolver.__init__(self)


# The most nodes a file may have with its aliases expanded. The repository's
# experiments.yaml has about 600; aliases may share a node many times over
# (nine aliases of nine aliases ... is a few lines and billions of nodes),
# and every key path is walked for its line, so past this the file is refused.
MAX_NODES = 100_000


def _key(node: yaml.Node) -> Any:
    """A mapping key as the loaded data holds it (``12:`` is the int 12), so a
    path into the data finds its line whatever type YAML gave the key."""
    if not isinstance(node, yaml.ScalarNode):
        return repr(node.value)
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    return _Constructor().construct_object(node)


def _past_max_nodes(node: yaml.Node) -> yaml.Node | None:
    """The node at which ``node``'s tree, aliases expanded, passes MAX_NODES, or None.

    Counted before anything expands the tree (`_walk`, the checks of the
    data), without recursion, so an alias bomb or a recursive alias fails at once.
    """
    stack, count = [node], 0
    while stack:
        here = stack.pop()
        count += 1
        if count > MAX_NODES:
            return here
        if isinstance(here, yaml.MappingNode):
            stack.extend(n for pair in here.value for n in pair)
        elif isinstance(here, yaml.SequenceNode):
            stack.extend(here.value)
    return None


def _too_many_nodes(where: str) -> str:
    return (
        f"{where}: more than {MAX_NODES:,} values with its aliases (*name) expanded; "
        "an experiment is far smaller, so this is refused before expanding them"
    )


# A lone surrogate ("\ud800" in a double-quoted YAML string) is no text: it was written to
# config.yaml and then crashed `sim list` printing it (UnicodeEncodeError). Traces refuse it too.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate(node: yaml.Node) -> str | None:
    """The problem of a scalar holding a lone surrogate, or None."""
    found = _SURROGATE.search(node.value) if isinstance(node, yaml.ScalarNode) and isinstance(node.value, str) else None
    return None if found is None else f"a lone surrogate (\\u{ord(found.group()):04x}) is not a character"


def _walk(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], where: str) -> None:
    if isinstance(node, yaml.ScalarNode):
        problem = _surrogate(node)
        if problem:
            raise ConfigError(f"{where}:{node.start_mark.line + 1}: {dotted(path) + ': ' if path else ''}{problem}")
    elif isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        merged_at: int | None = None
        merged_lines: list[dict[KeyPath, int]] = []
        for key, value in node.value:
            _walk(key, path, {}, where)  # a key's text too
            if key.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges at this level
                if merged_at is not None:  # PyYAML keeps the last merge alone, silently
                    raise ConfigError(f"{where}:{key.start_mark.line + 1}: {dotted(path) or 'top level'}: "
                                      f"a second '<<' merge key (the first is on line {merged_at}); "
                                      f"merge several with one: <<: [*a, *b]")
                merged_at = key.start_mark.line + 1
                merged = value.value if isinstance(value, yaml.SequenceNode) else [value]
                for sub in merged:
                    merged_lines.append({})
                    _walk(sub, path, merged_lines[-1], where)
                continue
            name = _key(key)
            if name in seen:
                raise ConfigError(f"{where}:{key.start_mark.line + 1}: {dotted(path + (name,))}: duplicate key")
            seen.add(name)
            lines[path + (name,)] = key.start_mark.line + 1
            _walk(value, path + (name,), lines, where)
        _add_merged(lines, path, seen, merged_lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk(item, path + (i,), lines, where)


def _add_merged(lines: dict[KeyPath, int], path: KeyPath, written: set[Any], merged: list[dict[KeyPath, int]]) -> None:
    """The marks of the keys a ``<<`` merge brings to ``path``: each key, with everything under
    it, from the mapping PyYAML takes it from, so only keys in the merged result are marked.

    A key written in the mapping itself wins, then the first merged mapping that has it. An
    ``engine:`` written beside ``<<: *base`` replaces base's engine whole; base's
    ``engine.gpus_per_replica`` kept its mark, so the key counted as set and was read from
    the defaults instead of the model spec.
    """
    n = len(path)
    taken = set(written)
    for sub_lines in merged:
        for sub_path, line in sub_lines.items():
            if sub_path[n] not in taken:
                lines[sub_path] = line
        taken |= {sub_path[n] for sub_path in sub_lines}


# PyYAML's words for a block layout it cannot read, and what usually causes them.
_LAYOUT_PROBLEMS = ("mapping values are not allowed here", "expected <block end>")
_LAYOUT_HINT = (" (a key on this line or the one above indented unlike the keys beside it, or a 'key: value' "
                "after another 'key:' on one line? A nested mapping goes on the lines below its key, indented "
                "further, or in braces: engine: {max_num_seqs: 8})")


def _layout_hint(problem: str | None) -> str:
    return _LAYOUT_HINT if problem and problem.startswith(_LAYOUT_PROBLEMS) else ""


def parse_document(text: str, where: str) -> tuple[yaml.Node | None, Any, dict[KeyPath, int]]:
    """The document's node, its data and the line of every key path; every
    way PyYAML can refuse a text becomes a ConfigError with the line it gives."""
    loader = None
    try:
        loader = _Loader(text)  # rejects control characters already
        node = loader.get_single_node()
        lines: dict[KeyPath, int] = {}
        bad = _past_max_nodes(node) if node is not None else None
        if bad is not None:
            raise ConfigError(_too_many_nodes(f"{where}:{bad.start_mark.line + 1}"))
        if node is not None:
            _walk(node, (), lines, where)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = exc.problem or exc.context
        raise ConfigError(f"{where}{line}: invalid YAML: {problem}{_layout_hint(problem)}") from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow; it gives a position, not a line
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{where}:{line}: invalid YAML: unacceptable character #x{exc.character:04x}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return node, data, lines


def load_value(text: str, where: str, path: KeyPath = ()) -> Any:
    """One YAML value, read as experiment files are (YAML 1.2 numbers, at
    most MAX_NODES, no key twice); raises yaml.YAMLError, or ConfigError
    naming ``where`` and the key ``path`` the value is for."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _past_max_nodes(node) is not None:
            raise ConfigError(_too_many_nodes(where))
        repeated = _repeated_key(node)
        if repeated is not None:  # the constructor keeps the last silently
            raise ConfigError(f"{where}: {dotted(path + repeated)}: duplicate key")
        stack = [node]
        while stack:  # no deeper than MAX_NODES, counted above
            here = stack.pop()
            problem = _surrogate(here)
            if problem:
                raise ConfigError(f"{where}: {problem}")
            if isinstance(here, yaml.MappingNode):
                stack.extend(n for pair in here.value for n in pair)
            elif isinstance(here, yaml.SequenceNode):
                stack.extend(here.value)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _repeated_key(node: yaml.Node) -> KeyPath | None:
    """The path of the first key given twice in one mapping of ``node``'s tree, or None."""
    stack: list[tuple[yaml.Node, KeyPath]] = [(node, ())]
    while stack:
        here, path = stack.pop()
        if isinstance(here, yaml.MappingNode):
            seen: set[Any] = set()
            for key, value in here.value:
                if key.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                    if "<<" in seen:  # a second merge key, as in a file (`_walk`)
                        return path + ("<<",)
                    seen.add("<<")
                    stack.append((value, path))
                    continue
                name = _key(key)
                if name in seen:
                    return path + (name,)
                seen.add(name)
                stack.append((value, path + (name,)))
        elif isinstance(here, yaml.SequenceNode):
            stack.extend((item, path + (i,)) for i, item in enumerate(here.value))
    return None


def dotted(path: KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes a string that either YAML 1.1 or our YAML 1.2
    loader would read as something else, so `_Loader` reads back what it
    wrote (``'09'`` and ``'1e3'`` are numbers to 1.2) and so does a plain
    PyYAML reader (``'yes'`` and ``'off'`` are booleans to 1.1). No aliases:
    every value is written out."""

    yaml_implicit_resolvers = {
        first: _Resolver.yaml_implicit_resolvers.get(first, []) + _YAML11_RULES.get(first, [])
        for first in set(_Resolver.yaml_implicit_resolvers) | set(_YAML11_RULES)
    }

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: _Dumper, data: str) -> yaml.ScalarNode:
    """A string with U+0085 (NEL) double-quoted, where it is written as the escape ``\\N``:
    PyYAML writes it raw inside single quotes, where a reader folds that line break to a
    space, so a config.yaml with one reran a different experiment ('a\\x85b' read 'a b')."""
    node = dumper.represent_str(data)
    if "\x85" in data:
        node.style = '"'
    return node


_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """Deterministic YAML text: fixed key order (as given), block style, no aliases."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
