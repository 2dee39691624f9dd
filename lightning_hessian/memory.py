"""How much memory a device has free, how much a set of tensors occupies, and how much a call took."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

GIB = 1024**3


def _cgroup_free_bytes() -> int | None:
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - usage)
    return None


def _meminfo_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free on ``device`` right now, or ``None`` where it cannot be told.

    On CUDA this is ``torch.cuda.mem_get_info``; on the CPU the smaller of the kernel's
    ``MemAvailable`` and the cgroup's remaining limit.

    Args:
        device: The device.

    Returns:
        Free bytes, or ``None``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    candidates = [b for b in (_meminfo_available_bytes(), _cgroup_free_bytes()) if b is not None]
    return min(candidates) if candidates else None


@contextlib.contextmanager
def saved_tensor_bytes() -> Iterator[list[int]]:
    """Count the bytes autograd saves for backward inside the block (distinct storages once).

    Yields:
        A one-element list holding the running byte count.

    Example:
        >>> with saved_tensor_bytes() as counter:
        ...     loss = model(x).sum()
        >>> counter[0] > 0
        True
    """
    counter = [0]
    seen: set[int] = set()

    def pack(tensor: Tensor) -> Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                counter[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counter


def allocator_peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes PyTorch's CPU allocator held at once while ``fn`` ran, above what it held before.

    Replays the allocations and frees that ``torch.profiler`` records (its private event tree), so it
    counts tensors only, not the process's other memory; the check of the shared Krylov space's
    memory formula (``benchmarks/basis_memory.py``, ``tests/test_shared_space.py``) uses it.

    Args:
        fn: The call to measure (its result is dropped).

    Returns:
        The peak, in bytes.

    Raises:
        RuntimeError: If the profiler recorded no allocation at all.

    Example:
        >>> allocator_peak_bytes(lambda: torch.empty(1024, dtype=torch.uint8)) >= 1024
        True
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        fn()
    changes: list[tuple[int, int]] = []
    stack = list(recorded.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    if not changes:
        raise RuntimeError("The profiler recorded no allocation: nothing to measure.")
    live = peak = 0
    for _, size in sorted(changes):  # frees are negative sizes
        live += size
        peak = max(peak, live)
    return peak
