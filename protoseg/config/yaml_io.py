"""Reading YAML config files strictly: duplicate keys and alias bombs are errors.

PyYAML keeps the last of two equal keys silently (two ``train:`` sections: the first is
lost), and its aliases let a few hundred bytes describe a tree of billions of nodes (the
"billion laughs"): the load itself shares nodes, but merging the config copies every one,
so the process hangs and runs out of memory. ``load_yaml`` refuses both, naming the file
and the line, before anything is constructed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# A config file uses a handful of aliases at most; a bomb needs many, or nests a few deep.
MAX_ALIASES = 1000
MAX_EXPANDED_NODES = 200_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YAMLInputError(ValueError):
    """A YAML file is invalid, repeats a key, or expands beyond the size limit."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and refuses a mapping key given twice."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 - PyYAML's hook
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise YAMLInputError(
                    f"{self.source}, line {mark.line + 1}: more than {MAX_ALIASES} aliases "
                    "(*name); a config file needs a few at most: write the values out"
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # noqa: D102
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue  # "<<: *base" merges; explicit keys may override merged ones
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    seen = first_line.get(key)
                except TypeError:
                    continue  # an unhashable key: PyYAML reports it itself
                if seen is not None:
                    raise YAMLInputError(
                        f"{self.source}, line {line}: the key {key!r} is repeated (first at "
                        f"line {seen}); YAML would silently keep only the last one: merge "
                        "the two into one"
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: Any) -> int:
    """Nodes of the tree once every alias is copied out (shared nodes counted per use)."""
    sizes: dict[int, int] = {}
    # Post-order without recursion: a deep file must not hit Python's recursion limit.
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if done or not children:
            sizes[id(node)] = min(
                1 + sum(sizes.get(id(c), 0) for c in children), 10 * MAX_EXPANDED_NODES
            )
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_yaml(text: str, source: str | Path) -> Any:
    """Parse one YAML document strictly (see the module doc); YAMLInputError names ``source``."""
    loader = _StrictLoader(text, str(source))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_EXPANDED_NODES:
            raise YAMLInputError(
                f"{source}: its aliases expand to more than {MAX_EXPANDED_NODES:,} values "
                f"(at least {size:,}); refused as an alias bomb: write the values out"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise YAMLInputError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
