"""Structure strings: one character per block, looked up in a registry of block types.

`TTTT` is four LLaMA blocks. Architectures register their own characters (SUBLLM adds the
subsample/upsample brackets, HGRN-Bit its own block), so the trainer never changes when a new
block type arrives.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from pretrain.errors import ConfigError

# char -> factory(model_cfg, spec, *, layer_id, n_blocks) -> nn.Module taking and returning a Payload
BLOCKS: dict[str, Callable[..., nn.Module]] = {}


def register_block(char: str):
    def deco(factory):
        if len(char) != 1:
            raise ValueError("a block type is one character")
        BLOCKS[char] = factory
        return factory

    return deco


def parse_structure(structure: str) -> list[str]:
    """Validate a structure string and return its block characters in order."""
    if not structure:
        raise ConfigError("model.structure is empty: give one character per block, e.g. 'TTTT'")
    for i, ch in enumerate(structure):
        if ch not in BLOCKS:
            known = ", ".join(repr(k) for k in sorted(BLOCKS))
            raise ConfigError(f"model.structure: unknown block type {ch!r} at position {i} "
                              f"(known: {known})")
    return list(structure)


def _register_builtin() -> None:
    from pretrain.models.block import TransformerBlock

    register_block("T")(TransformerBlock)


_register_builtin()
