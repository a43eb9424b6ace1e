"""The bounded YAML loader: a config file's bytes -> its YAML data, or ConfigError.

Any bytes may be in the file (it is edited by hand, and the watcher reloads every save), so
reading and composing are bounded in time and memory before anything else sees the data:
only a regular file is read, up to MAX_FILE_BYTES; the text must be UTF-8; YAML is composed
with limits on nesting and on what aliases expand to, and numbers with limits on their
length, before anything (the constructor, the line map, a repr) walks the tree. Whatever
PyYAML raises comes out as a ConfigError naming the line. What the data means is
gearvisor.config.load's business.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from gearvisor.config.errors import ConfigError, Problem, dotted, show
from gearvisor.config.values import OctalLiteral

try:  # libyaml scans and parses ~5x faster; the composer with the limits stays ours
    from yaml.cyaml import CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    CParser = None

# What a config may be. A real one is a few KiB, about 6 levels deep and a few hundred nodes;
# each limit is far above that and far below what would take seconds or much memory.
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32  # nesting levels, counting what aliases expand to
MAX_NODES = 20_000  # YAML nodes (keys, values, items), counting what aliases expand to
MAX_NUMBER_CHARS = 1000  # a YAML int or float literal; the largest setting needs 19 digits
# An int of more digits is refused: str() of it may fail (PYTHONINTMAXSTRDIGITS can be as low
# as 640), and a 400-digit one still reaches the setting, which says what range it takes.
MAX_INT_DIGITS = 600


class _Refused(Exception):
    """The YAML is over a limit (nesting, alias expansion, a number's length) or holds a
    value no setting can take; `mark` is where, `path` the key path when known."""

    def __init__(self, message: str, mark: Any, path: tuple = (), node: Node | None = None
                 ) -> None:
        super().__init__(message)
        self.mark = mark
        self.path = path
        self.node = node  # refused by the constructor: its key path is looked up


class _BoundedComposer(Composer):
    """PyYAML's composer, counting as it composes, so a hostile document is refused before
    anything (the constructor, the line map, a repr) walks it.

    Aliases are counted as what they expand to: `a: &a [x, x]; b: &b [*a, *a] ...` (an alias
    bomb, "billion laughs") is small as nodes but huge as a tree. An alias inside the node
    it names (`x: &r [*r]`) is a cycle: refused, since nothing in a config is recursive.
    """

    def _start_budget(self) -> None:
        self._depth = 0
        self._deepest = 0  # the deepest level the node being composed reaches
        self._nodes = 0
        self._chars = 0
        self._open: set[str] = set()  # anchors whose node is being composed
        self._sizes: dict[str, tuple[int, int, int]] = {}  # anchor -> nodes, chars, height
        self._path: list[Any] = []

    def _spend(self, nodes: int, chars: int, depth: int, mark: Any) -> None:
        self._nodes += nodes
        self._chars += chars
        self._deepest = max(self._deepest, depth)
        if depth > MAX_DEPTH:
            self._refuse(f"nested deeper than {MAX_DEPTH} levels (a config needs about 6)",
                         mark)
        if self._nodes > MAX_NODES:
            self._refuse(f"more than {MAX_NODES} values, counting what aliases (*name) "
                         "expand to; is this the right file, or an alias bomb?", mark)
        if self._chars > MAX_FILE_BYTES:
            self._refuse(f"aliases (*name) expand the text to more than {MAX_FILE_BYTES} "
                         "characters", mark)

    def _refuse(self, message: str, mark: Any) -> None:
        path = tuple(p for p in self._path if p is not None)
        raise _Refused(message, mark, path[:6] + (("...",) if len(path) > 6 else ()))

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            if event.anchor in self._open:
                self._refuse(f"the alias *{event.anchor} is inside the node it names (a "
                             "recursive alias); a config has no cycles", event.start_mark)
            nodes, chars, height = self._sizes.get(event.anchor, (1, 0, 1))
            self._spend(nodes, chars, self._depth + height, event.start_mark)
            return super().compose_node(parent, index)
        depth = self._depth + 1
        chars = len(event.value) if isinstance(event, ScalarEvent) else 0
        self._path.append(index.value if isinstance(index, ScalarNode) else
                          index if isinstance(index, int) else None)
        self._spend(1, chars, depth, event.start_mark)
        nodes_before, chars_before, outer = self._nodes, self._chars, self._deepest
        self._depth = self._deepest = depth
        anchor = event.anchor
        if anchor is not None:
            self._open.add(anchor)
        node = super().compose_node(parent, index)
        if anchor is not None:
            self._open.discard(anchor)
            self._sizes[anchor] = (self._nodes - nodes_before + 1,
                                   self._chars - chars_before + chars, self._deepest - depth + 1)
        self._depth = depth - 1
        self._deepest = max(outer, self._deepest)
        self._path.pop()
        return node


class _Constructor(SafeConstructor):
    """SafeConstructor whose scalars cannot raise anything but _Refused: PyYAML lets
    ValueError out for `0x_` or `2001-13-45`, IndexError for `!!int ""`, KeyError for
    `!!bool x`, and int() refuses past 4,300 digits."""

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                OverflowError) as e:
            # PyYAML's scalar constructors assume the text matched the tag's pattern; an
            # explicit tag (`!!int ""`) skips that match
            tag = re.sub(r"^tag:yaml\.org,2002:", "!!", node.tag or "")
            raise _Refused(f"{show(node.value)} is not a valid {tag} ({type(e).__name__})",
                           node.start_mark, node=node) from None

    def construct_yaml_int(self, node: ScalarNode) -> int:
        value = self._number(node, super().construct_yaml_int)
        if re.fullmatch(r"0[0-7_]+", node.value):  # YAML 1.1 octal: keep the digits too
            value = OctalLiteral(value, node.value.replace("_", ""))
        if value.bit_length() > MAX_INT_DIGITS * 3.32:  # log2(10): about that many digits
            raise _Refused(f"a number of more than {MAX_INT_DIGITS} digits is too long (no "
                           "setting takes more than 19)", node.start_mark, node=node)
        return value

    def construct_yaml_float(self, node: ScalarNode) -> float:
        return self._number(node, super().construct_yaml_float)

    def _number(self, node: ScalarNode, construct: Callable[[ScalarNode], Any]) -> Any:
        if len(node.value) > MAX_NUMBER_CHARS:
            # also keeps sexagesimal `1:0:0:...` (one multiplication per part) cheap
            raise _Refused(f"a number of {len(node.value)} characters is too long (no "
                           f"setting takes more than {MAX_NUMBER_CHARS})", node.start_mark,
                           node=node)
        try:
            return construct(node)
        except (ValueError, OverflowError):
            raise _Refused(f"{show(node.value)} looks like a number but is not one; quote "
                           "it if it is text", node.start_mark, node=node) from None

    def construct_yaml_timestamp(self, node: ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError):
            raise _Refused(f"{show(node.value)} looks like a date but is not a valid one; "
                           "quote it if it is text", node.start_mark, node=node) from None

    def construct_undefined(self, node: Node) -> Any:
        tag = re.sub(r"^tag:yaml\.org,2002:", "!!", node.tag or "")
        raise _Refused(f"the YAML tag {show(tag)} is not allowed: a config holds plain "
                       "text, numbers, true/false, lists and mappings", node.start_mark,
                       node=node)


_Constructor.add_constructor("tag:yaml.org,2002:int", _Constructor.construct_yaml_int)
_Constructor.add_constructor("tag:yaml.org,2002:float", _Constructor.construct_yaml_float)
_Constructor.add_constructor("tag:yaml.org,2002:timestamp",
                             _Constructor.construct_yaml_timestamp)
_Constructor.add_constructor(None, _Constructor.construct_undefined)


# What a number too long to resolve looks like: one pass, no backtracking
_LONG_NUMBER = re.compile(r"[-+]?(?:0[xXbBoO][0-9a-fA-F_]*|[0-9.][0-9_.:eE+-]*)")


class _Resolver(Resolver):
    """PyYAML's patterns for int, float and date are not run on a plain scalar longer than any
    number (on a 1 MiB `1:00:00:...` the regex engine's backtracking stack took 50 MB): one
    that looks like a number is an int, which the constructor refuses as too long; anything
    else is text."""

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        if kind is ScalarNode and implicit[0] and len(value) > MAX_NUMBER_CHARS:
            if _LONG_NUMBER.fullmatch(value):
                return "tag:yaml.org,2002:int"
            return self.DEFAULT_SCALAR_TAG
        return super().resolve(kind, value, implicit)


class _PyLoader(Reader, Scanner, Parser, _BoundedComposer, _Constructor, _Resolver):
    """PyYAML's pure-Python reader, scanner and parser with our composer, constructor and
    resolver: the loader where libyaml is missing (tests run every limit with both)."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        _BoundedComposer.__init__(self)
        self._start_budget()
        _Constructor.__init__(self)
        _Resolver.__init__(self)


if CParser is not None:
    class _CLoader(_BoundedComposer, CParser, _Constructor, _Resolver):  # type: ignore
        """libyaml scans and parses; our composer (first in the MRO) builds the nodes."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _BoundedComposer.__init__(self)
            self._start_budget()
            _Constructor.__init__(self)
            _Resolver.__init__(self)

    _LOADER: type = _CLoader
else:  # pragma: no cover
    _LOADER = _PyLoader


@dataclass
class Document:
    """A config file's YAML: its data, the line of each key path, duplicate keys."""

    data: Any
    lines: dict[tuple, int]
    duplicates: list[Problem]


def _line_of(text_: str, position: int, in_bytes: bool) -> tuple[int, int]:
    """1-based line and column of a character (or, from libyaml, byte) offset."""
    before = text_.encode("utf-8", "replace")[:position] if in_bytes else text_[:position]
    nl = "\n" if isinstance(before, str) else b"\n"
    return before.count(nl) + 1, position - (before.rfind(nl) + 1) + 1  # type: ignore[arg-type]


def compose(text_: str, file: str) -> Document:
    """The YAML of a config, within the limits; raise ConfigError for anything else."""
    loader_class = _LOADER  # read at each call: tests set this module's _LOADER to _PyLoader
    if len(text_) > MAX_FILE_BYTES:
        raise ConfigError(file, [Problem("", f"is larger than {MAX_FILE_BYTES // 1024} KiB; a "
                                         "pool spec is a few KiB: is this the right file?")])
    try:
        text_.encode("utf-8")
    except UnicodeEncodeError as e:  # only through parse(): a read file is decoded UTF-8
        line, column = _line_of(text_, e.start, False)
        raise ConfigError(file, [Problem("", f"column {column}: a lone surrogate is not "
                                         "text; save the file as UTF-8", line)]) from None
    in_bytes = loader_class is not _PyLoader  # libyaml reports byte offsets
    ldr = None
    try:
        ldr = loader_class(text_)  # PyYAML's Reader checks the characters here already
        root = ldr.get_single_node()
        lines: dict[tuple, int] = {}
        paths: dict[int, tuple] = {}  # id(node) -> its first key path, for _Refused below
        duplicates: list[Problem] = []

        def walk(node: Node, path: tuple) -> None:
            # Bounded: the composer counted every node an alias expands to.
            lines.setdefault(path, node.start_mark.line + 1)
            paths.setdefault(id(node), path)
            if isinstance(node, MappingNode):
                seen = set()
                for k, v in node.value:
                    key = k.value if isinstance(k, ScalarNode) else None
                    if key is not None and key in seen:
                        duplicates.append(Problem(dotted(path + (key,)),
                                                  "key is given twice; remove one",
                                                  k.start_mark.line + 1))
                    seen.add(key)
                    lines[path + (key,)] = k.start_mark.line + 1
                    paths.setdefault(id(k), path + (key,))
                    walk(v, path + (key,))
            elif isinstance(node, SequenceNode):
                for i, item in enumerate(node.value):
                    walk(item, path + (i,))

        if root is not None:
            walk(root, ())
        try:
            data = ldr.construct_document(root) if root is not None else None
        except _Refused as e:
            e.path = paths.get(id(e.node), ())
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                OverflowError) as e:
            # outside any one node (a mapping's items are built after the mapping):
            # PyYAML's, not the operator's, so no line to give
            raise ConfigError(file, [Problem("", f"YAML cannot be read ({type(e).__name__}: "
                                             f"{show(str(e))})")]) from None
    except _Refused as e:
        column = f" column {e.mark.column + 1}" if e.mark else ""
        raise ConfigError(file, [Problem(dotted(e.path), f"YAML{column}: {e}",
                                         e.mark.line + 1 if e.mark else None)]) from None
    except yaml.reader.ReaderError as e:
        line, column = _line_of(text_, e.position, in_bytes)
        raise ConfigError(file, [Problem("", f"column {column}: the character #x"
                                         f"{e.character:04x} is not allowed in YAML ("
                                         f"{e.reason}); remove it", line)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        line = mark.line + 1 if mark else None
        col = f" column {mark.column + 1}" if mark else ""
        if problem == "exceeded maximum nesting depth":
            # libyaml's own limit (1000 levels): its scanner looks ahead in a flow
            # collection, so it can get there before our composer's MAX_DEPTH
            raise ConfigError(file, [Problem("", f"YAML{col}: nested deeper than {MAX_DEPTH} "
                                             "levels (a config needs about 6)", line)]) from None
        raise ConfigError(file, [Problem("", f"YAML syntax error{col}: {problem}", line)]) \
            from None
    finally:
        if ldr is not None:
            ldr.dispose()
    return Document(data, lines, duplicates)


def read_file(path: str) -> bytes:
    """The bytes of a config file, at most MAX_FILE_BYTES; raise ConfigError (never OSError).

    Only a regular file is opened for reading: a FIFO would block the read forever, and
    /dev/zero never ends."""
    file = os.path.abspath(path)

    def refuse(message: str) -> ConfigError:
        return ConfigError(file, [Problem("", message)])

    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise refuse("is a directory; pass the config file itself with -c FILE (see "
                         "conf/pools.yaml)")
        if not stat.S_ISREG(st.st_mode):
            raise refuse("is not a regular file (a FIFO, socket or device); pass the config "
                         "file itself with -c FILE")
        # O_NONBLOCK: if a FIFO took the file's place since the stat, open does not wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise refuse("is not a regular file; pass the config file itself with -c FILE")
            chunks, size_ = [], 0
            while size_ <= MAX_FILE_BYTES:
                chunk = os.read(fd, MAX_FILE_BYTES + 1 - size_)
                if not chunk:
                    break
                chunks.append(chunk)
                size_ += len(chunk)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise refuse("file not found; pass the pool spec with -c FILE (see conf/pools.yaml)") \
            from None
    except PermissionError:
        raise refuse("permission denied; let the user gearvisor runs as read the file (and "
                     "enter its directories)") from None
    except OSError as e:
        raise refuse(f"cannot read: {e.strerror or e}") from None
    except ValueError as e:  # a NUL byte in the path
        raise refuse(f"cannot read: {e}") from None
    if size_ > MAX_FILE_BYTES:
        raise refuse(f"is larger than {MAX_FILE_BYTES // 1024} KiB; a pool spec is a few KiB: "
                     "is this the right file?")
    return b"".join(chunks)


def decode(data: bytes, file: str) -> str:
    """The text of a config file: UTF-8, or a ConfigError naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(os.path.abspath(file), [Problem(
            "", f"column {column}: byte {data[e.start]:#04x} is not UTF-8 text; save the file "
            "as UTF-8", line)]) from None


def load_yaml(path: str) -> Any:
    """Just the YAML data of a config file, read and composed with the same limits as
    load(); raise ConfigError. For the CLI, which finds control_socket in a config before
    (or without) validating it."""
    file = os.path.abspath(path)
    return compose(decode(read_file(path), file), file).data
