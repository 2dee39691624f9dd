"""Walking nested batches: the one place that knows which containers a batch may be made of.

A batch is a tensor or any nesting of dicts (mappings), lists, tuples, namedtuples and dataclasses
holding tensors; every other leaf (strings, numbers, ``None``) is carried along untouched. Every part
of the library that looks inside a batch (its size, its dtype, its fingerprint, copies of it) goes
through :func:`map_tensors` or :func:`iter_tensors`, so all of them accept the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

BatchSizeFn = Callable[[Any], int]


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a nested batch, keeping its structure and container types.

    Args:
        batch: A tensor, or a nesting of mappings, lists, tuples, namedtuples and dataclasses.
        fn: Applied to each tensor.

    Returns:
        A new batch of the same structure (non-tensor leaves are shared, not copied).

    Example:
        >>> map_tensors({"x": torch.ones(2), "name": "a"}, lambda t: 2 * t)
        {'x': tensor([2., 2.]), 'name': 'a'}
    """
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        items = {key: map_tensors(value, fn) for key, value in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:  # a mapping type that cannot be built from a dict (e.g. defaultdict)
            return items
    if _is_namedtuple(batch):
        return type(batch)(*(map_tensors(value, fn) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(map_tensors(value, fn) for value in batch)
    if _is_dataclass_instance(batch):
        changes = {
            f.name: map_tensors(getattr(batch, f.name), fn) for f in dataclasses.fields(batch) if f.init
        }
        return dataclasses.replace(batch, **changes)
    return batch


def iter_tensors(batch: Any) -> Iterator[Tensor]:
    """Yield every tensor of a nested batch in order (mapping values in insertion order).

    Example:
        >>> [t.shape[0] for t in iter_tensors((torch.zeros(3), {"y": torch.zeros(2)}))]
        [3, 2]
    """
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from iter_tensors(value)
    elif isinstance(batch, list | tuple):
        for value in batch:
            yield from iter_tensors(value)
    elif _is_dataclass_instance(batch):
        for f in dataclasses.fields(batch):
            yield from iter_tensors(getattr(batch, f.name))


def infer_batch_size(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of the first tensor found in it.

    Args:
        batch: A tensor, or a (nested) tuple, list, dict or dataclass holding tensors.

    Returns:
        The batch size.

    Raises:
        ValueError: If the batch holds no tensor with a batch dimension.

    Example:
        >>> infer_batch_size((torch.zeros(8, 3), torch.zeros(8)))
        8
    """
    tensor = next(iter_tensors(batch), None)
    if tensor is None or tensor.ndim == 0:
        raise ValueError(
            f"Cannot infer the size of a batch of type {type(batch).__name__}: it holds no tensor "
            "with a batch dimension. Pass `batch_size_fn=lambda batch: <number of samples>`."
        )
    return int(tensor.shape[0])


def prepare_batch(batch: Any, dtype: torch.dtype | None = None) -> Any:
    """Make a batch usable for differentiation.

    Floating tensors are cast to ``dtype``, and tensors created under ``torch.inference_mode`` are
    copied into normal tensors (autograd cannot save inference tensors for backward).

    Args:
        batch: A tensor or nested container of tensors.
        dtype: Floating dtype to cast floating tensors to, or ``None`` to keep them.

    Returns:
        The batch with the same structure.

    Example:
        >>> prepare_batch((torch.ones(2), torch.ones(2, dtype=torch.long)), torch.float64)[0].dtype
        torch.float64
    """

    def convert(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if t.is_inference():
            with torch.inference_mode(False):
                t = t.clone()
        return t

    with torch.inference_mode(False):
        return map_tensors(batch, convert)


def detached_copy(batch: Any) -> Any:
    """Copy every tensor of a nested batch, detached from any graph, on the same device.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> detached_copy({"x": x})["x"].requires_grad
        False
    """
    return map_tensors(batch, lambda t: t.detach().clone())


def batch_signature(batch: Any) -> tuple[Any, ...]:
    """Shapes and dtypes of every tensor of a batch, in order: equal for batches of one layout.

    Example:
        >>> batch_signature((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))
        (((2, 3), 'torch.float32'), ((2,), 'torch.int64'))
    """
    return tuple((tuple(t.shape), str(t.dtype)) for t in iter_tensors(batch))


def fingerprint(batches: Sequence[Any]) -> str:
    """A SHA-256 digest of the batches' tensors (dtype, shape and values) in order.

    Two lists of batches with equal tensors have equal fingerprints on any device, so a resumed
    run can tell whether it evaluates on the same samples as the checkpointed one.

    Args:
        batches: Batches (tensors or nested containers of tensors).

    Returns:
        A hex digest.

    Example:
        >>> fingerprint([torch.zeros(2)]) == fingerprint([torch.zeros(2)])
        True
    """
    digest = hashlib.sha256()
    for index, batch in enumerate(batches):
        digest.update(f"batch{index}".encode())
        for tensor in iter_tensors(batch):
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            digest.update(f"{flat.dtype}{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
