"""Parameter space: which parameters the Hessian is taken over, their blocks and their flat order.

The flat order is that of ``model.named_parameters()`` after selection, each tensor flattened
row-major. A parameter shared by two modules appears once (``named_parameters`` deduplicates it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from .validation import check_choice, check_patterns

Patterns = str | Sequence[str] | None
BlocksSpec = str | Mapping[str, str | Sequence[str]] | None

BLOCK_KINDS = ("model", "module", "parameter")
ROOT_MODULE_NAME = "root"
_COMPILED_WRAPPER = "_orig_mod"


def check_blocks(blocks: object) -> BlocksSpec:
    """Check a ``blocks=`` argument's form (which parameters it matches is checked by :func:`resolve_blocks`).

    Args:
        blocks: ``None``, one of :data:`BLOCK_KINDS`, or a non-empty mapping ``block name -> pattern(s)``.

    Returns:
        ``blocks``.

    Raises:
        TypeError: For a value of the wrong type (or a mapping with non-string names or patterns).
        ValueError: For an unknown kind or an empty mapping.

    Example:
        >>> check_blocks({"features": "features.*"})
        {'features': 'features.*'}
    """
    fix = (
        "Use None or 'model' (whole selection), 'module', 'parameter', or a mapping "
        "{block name: glob pattern(s)}."
    )
    if blocks is None:
        return None
    if isinstance(blocks, str):
        check_choice("blocks", blocks, BLOCK_KINDS, fix)
        return blocks
    if not isinstance(blocks, Mapping):
        raise TypeError(f"`blocks` must be None, a string or a mapping, got {type(blocks).__name__}. {fix}")
    if not blocks:
        raise ValueError(f"`blocks` is an empty mapping. {fix}")
    for name, patterns in blocks.items():
        if not isinstance(name, str):
            raise TypeError(f"`blocks` keys must be block names (strings), got {name!r}.")
        check_patterns(f"blocks[{name!r}]", patterns)
    return blocks


def display_name(name: str) -> str:
    """A parameter or module name as the user wrote the model: without ``torch.compile``'s wrapper.

    A compiled submodule registers the original under ``_orig_mod``, so its parameters are named
    ``encoder._orig_mod.weight``; block names and logged names use ``encoder.weight``.

    Example:
        >>> display_name("encoder._orig_mod.layers.0.weight")
        'encoder.layers.0.weight'
    """
    return ".".join(part for part in name.split(".") if part != _COMPILED_WRAPPER)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a pattern matches the real name or the name without ``torch.compile``'s wrapper."""
    names = {name, display_name(name)}
    return any(fnmatch.fnmatchcase(n, pattern) for n in names for pattern in patterns)


def select_parameters(model: nn.Module, params: Patterns = None) -> dict[str, nn.Parameter]:
    """Select the trainable parameters the Hessian is taken over.

    Args:
        model: The module.
        params: Glob pattern(s) on ``named_parameters()`` names; ``None`` selects all trainable ones.

    Returns:
        Selected parameters by name, in ``named_parameters()`` order. Frozen parameters
        (``requires_grad=False``) are never selected; shared parameters appear once.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, or ``params`` not pattern(s).
        ValueError: If nothing is selected, naming the available parameters.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> list(select_parameters(model, "0.*"))
        ['0.weight', '0.bias']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params is None:
        selected = trainable
    else:
        patterns = check_patterns("params", params)
        selected = {n: p for n, p in trainable.items() if _matches(n, patterns)}
    if not selected:
        available = ", ".join(list(trainable)[:12]) or "none"
        raise ValueError(
            f"`params={params!r}` selects no trainable parameter of {type(model).__name__}. "
            f"Trainable parameters: {available}{' ...' if len(trainable) > 12 else ''}. "
            "Pass glob patterns on these names, or None for all."
        )
    return selected


def module_name_of(parameter_name: str) -> str:
    """Name of the module that owns a parameter directly (``"root"`` for the top-level module)."""
    return display_name(parameter_name.rpartition(".")[0]) or ROOT_MODULE_NAME


def resolve_blocks(names: Sequence[str], blocks: BlocksSpec) -> dict[str, tuple[str, ...]]:
    """Group selected parameter names into named diagonal blocks.

    Args:
        names: Selected parameter names, in flat order.
        blocks: ``None``/``"model"`` (one block ``"model"``), ``"module"`` (one block per module that
            owns parameters directly, keyed by module name), ``"parameter"`` (one per tensor), or a
            mapping ``block name -> glob pattern(s)``.

    Returns:
        Block name -> parameter names (each in flat order). Blocks are disjoint.

    Raises:
        ValueError: For an unknown kind, a group matching nothing, or a parameter in two groups.
        TypeError: For a ``blocks`` of the wrong type.

    Example:
        >>> resolve_blocks(["0.weight", "0.bias", "1.weight"], "module")
        {'0': ('0.weight', '0.bias'), '1': ('1.weight',)}
    """
    check_blocks(blocks)
    if blocks is None or blocks == "model":
        return {"model": tuple(names)}
    if blocks == "parameter":
        return {display_name(n): (n,) for n in names}
    if blocks == "module":
        grouped: dict[str, list[str]] = {}
        for n in names:
            grouped.setdefault(module_name_of(n), []).append(n)
        return {k: tuple(v) for k, v in grouped.items()}
    result: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for block_name, patterns in blocks.items():
        pats = check_patterns(f"blocks[{block_name!r}]", patterns)
        members = tuple(n for n in names if _matches(n, pats))
        if not members:
            raise ValueError(
                f"`blocks[{block_name!r}]={patterns!r}` matches no selected parameter; "
                f"selected parameters are: {', '.join(names[:12])}."
            )
        for n in members:
            if n in owner:
                raise ValueError(
                    f"Parameter {n!r} is in both `blocks[{owner[n]!r}]` and "
                    f"`blocks[{block_name!r}]`; diagonal blocks must be disjoint."
                )
            owner[n] = block_name
        result[str(block_name)] = members
    return result


@dataclass(frozen=True)
class ParameterSpace:
    """Names, shapes and flat offsets of the selected parameters.

    Attributes:
        names: Parameter names in flat order.
        shapes: Their shapes.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> ParameterSpace:
        """Build the space of a name -> tensor mapping (in its order)."""
        return cls(tuple(tensors), tuple(t.shape for t in tensors.values()))

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Number of entries of each tensor."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @cached_property
    def numel(self) -> int:
        """Total number of parameters ``N``."""
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        """Flat index range of each parameter."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out[name] = slice(start, start + size)
            start += size
        return out

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate tensors (a leading batch dimension allowed) into flat vectors.

        Args:
            tensors: Name -> tensor of the parameter's shape, or ``[m, *shape]`` for a batch.

        Returns:
            ``[N]``, or ``[m, N]`` for batched input.
        """
        first = tensors[self.names[0]]
        batched = first.ndim == len(self.shapes[0]) + 1
        lead = (first.shape[0],) if batched else ()
        return torch.cat([tensors[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector ``[N]`` (or batch ``[m, N]``) into named views of the parameter shapes.

        Raises:
            ValueError: If the last dimension is not ``N``.
        """
        if flat.shape[-1] != self.numel:
            raise ValueError(f"Expected a last dimension of {self.numel}, got {tuple(flat.shape)}.")
        lead = tuple(flat.shape[:-1])
        pieces = torch.split(flat, self.sizes, dim=-1)
        return {
            n: piece.reshape(*lead, *shape)
            for n, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }

    def subspace(self, names: Sequence[str]) -> ParameterSpace:
        """The space of a subset of the parameters, in this space's order (built once per subset)."""
        key = tuple(names)
        cached = self._subspaces.get(key)
        if cached is None:
            wanted = set(key)
            kept = [(n, s) for n, s in zip(self.names, self.shapes, strict=True) if n in wanted]
            cached = ParameterSpace(tuple(n for n, _ in kept), tuple(s for _, s in kept))
            self._subspaces[key] = cached
        return cached

    @cached_property
    def _subspaces(self) -> dict[tuple[str, ...], ParameterSpace]:
        return {}
