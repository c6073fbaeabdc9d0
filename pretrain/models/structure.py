"""Structure strings: the network's shape, one character per block.

    TTTTT(TTTTT(TTTT)TTTTT)TTTTT

Each letter is a block type from a registry (`T` = LLaMA block); architectures register their
own letters, so the trainer never changes when a new block type arrives. `(` opens a
subsampled level (SUBLLM: keep the most important tokens) and `)` closes it (upsample +
bypass); levels nest to any depth and are numbered in order of their `(`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from pretrain.errors import ConfigError

# char -> factory(model_cfg, spec, *, layer_id, n_blocks) -> nn.Module taking and returning a Payload
BLOCKS: dict[str, Callable[..., nn.Module]] = {}
OPEN, CLOSE = "(", ")"


def register_block(char: str):
    def deco(factory):
        if len(char) != 1 or char in (OPEN, CLOSE):
            raise ValueError(f"a block type is one character other than brackets, got {char!r}")
        BLOCKS[char] = factory
        return factory

    return deco


@dataclass(frozen=True)
class Item:
    kind: str  # "block" | "open" | "close"
    char: str
    index: int  # block: layer id (0..n_blocks-1); open/close: level id (order of its "(")
    depth: int  # nesting depth this item runs at (0 = full sequence)


def parse_structure(structure: str) -> list[Item]:
    """Validate a structure string; blocks and level brackets in order."""
    if not structure:
        raise ConfigError("model.structure is empty: give one character per block, e.g. 'TTTT'")
    items: list[Item] = []
    open_levels: list[tuple[int, int, int]] = []  # (level id, position of its "(", blocks before it)
    n_blocks = n_levels = 0
    for i, ch in enumerate(structure):
        if ch == OPEN:
            items.append(Item("open", ch, n_levels, len(open_levels)))
            open_levels.append((n_levels, i, n_blocks))
            n_levels += 1
        elif ch == CLOSE:
            if not open_levels:
                raise ConfigError(f"model.structure: ')' at position {i} closes no level")
            level, start, blocks_before = open_levels.pop()
            if n_blocks == blocks_before:
                raise ConfigError(f"model.structure: the level opened at position {start} holds no block")
            items.append(Item("close", ch, level, len(open_levels)))
        elif ch in BLOCKS:
            items.append(Item("block", ch, n_blocks, len(open_levels)))
            n_blocks += 1
        else:
            known = ", ".join(repr(k) for k in sorted(BLOCKS))
            raise ConfigError(f"model.structure: unknown block type {ch!r} at position {i} "
                              f"(known: {known}, and '(' / ')' for subsampled levels)")
    if open_levels:
        raise ConfigError(f"model.structure: the level opened at position {open_levels[-1][1]} is never closed")
    if n_blocks == 0:
        raise ConfigError("model.structure holds no block")
    return items


def u_shaped(n_layers: int, block: str = "T") -> str:
    """SUBLLM's two nested levels for n_layers blocks, in the released 24-layer model's proportions
    (5 outer, 5 middle and 4 inner blocks: TTTTT(TTTTT(TTTT)TTTTT)TTTTT); the inner level takes
    what rounding leaves. 12 -> TT(TT(TTTT)TT)TT."""
    side = max(1, min(round(n_layers * 5 / 24), (n_layers - 1) // 4))
    inner = n_layers - 4 * side
    if inner < 1:
        raise ConfigError(f"a U-shaped SUBLLM structure needs at least 5 blocks, got {n_layers}")
    return f"{block * side}({block * side}({block * inner}){block * side}){block * side}"


def count_levels(structure: str) -> int:
    return structure.count(OPEN)


def _register_builtin() -> None:
    from pretrain.models.block import TransformerBlock
    from pretrain.models.hgrnbit import HGRNBlock

    register_block("T")(TransformerBlock)
    register_block("H")(HGRNBlock)


_register_builtin()
