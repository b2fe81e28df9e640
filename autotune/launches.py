"""What a training step asks of the device, counted at PyTorch's dispatcher: kernel launches,
and every place where the host has to wait for the device.

On a GPU a step is bound by one of two things: the device's arithmetic, or the host issuing
kernels (about 5 us each) and waiting on the device. `StepProbe` counts both while it is active:

* `launches`: dispatched operators that run a kernel. Views, reshapes and allocations run
  none; a `_foreach_*` or fused-optimizer operator counts once (on a GPU it launches one kernel
  per chunk of tensors). On a compiled step use a profiler instead: compiled kernels bypass
  the dispatcher.
* `syncs`, by kind: `item` (`.item()`, `int(t)`, `bool(t)`: `_local_scalar_dense`), `nonzero`,
  `masked_select` and `bool_index` (an output whose size depends on the data), `to_host`
  (`.cpu()`, `.tolist()`, `.numpy()` of a device tensor), and `blocking_h2d`: host memory copied
  to the device without `non_blocking` (or, on CUDA, from memory that is not pinned), or a
  tensor built from host numbers with `device=` inside the step.

On the CPU there is no second device, so the probe emulates one: tensors a collator made are
host memory (`host_work` wraps the collator and marks what it returns), everything else is
the device's. A `.to(device)` of host memory is then the host-to-device copy it is on a GPU,
and the same counts come out of a CPU run as out of a CUDA one. Work inside `host_work` is
the host's own and is not counted at all.
"""

from __future__ import annotations

import contextlib
import traceback
import weakref
from collections import Counter
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SYNC_KINDS = ("item", "nonzero", "masked_select", "bool_index", "to_host", "blocking_h2d")

_aten = torch.ops.aten
# Operators that allocate or describe but run no kernel.
_NO_KERNEL = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
              _aten._local_scalar_dense.default, _aten.lift_fresh.default, _aten._unsafe_view.default, _aten.sym_size.int,
              _aten.sym_stride.int, _aten.sym_numel.default, _aten.is_same_size.default}
_DATA_DEPENDENT = {_aten.nonzero.default: "nonzero", _aten.masked_select.default: "masked_select"}
_INDEXING = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default}
_READS = {"tolist": "to_host", "numpy": "to_host", "cpu": "to_host"}
_FACTORIES = ("tensor", "as_tensor", "asarray")


def runs_a_kernel(func: Any) -> bool:
    """Whether a dispatched operator launches a kernel: not a view or alias of an input (an
    in-place operator writes, so it does), not a bare allocation."""
    return func not in _NO_KERNEL and not func.is_view


def _site() -> str:
    """The innermost frame outside torch and this module: where a sync comes from."""
    for frame in reversed(traceback.extract_stack(limit=40)[:-3]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and not name.endswith("autotune/launches.py"):
            return f"{'/'.join(name.rsplit('/', 2)[-2:])}:{frame.lineno} {frame.name}"
    return "?"


class _Dispatch(TorchDispatchMode):
    def __init__(self, probe: "StepProbe"):
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        probe = self.probe
        if probe.counting():
            if probe.on_device(args, kwargs):
                if func in _DATA_DEPENDENT:
                    probe.sync(_DATA_DEPENDENT[func])
                elif func is _aten._local_scalar_dense.default:
                    probe.sync("item")
                elif func in _INDEXING and _has_bool_index(args):
                    probe.sync("bool_index")
                if runs_a_kernel(func):
                    probe.launches += 1
        return func(*args, **kwargs)


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()) if i is not None)


class _Functions(TorchFunctionMode):
    def __init__(self, probe: "StepProbe"):
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        probe = self.probe
        name = getattr(func, "__name__", "")
        if not probe.counting():
            return func(*args, **kwargs)
        if name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor):
            source = args[0]
            moves = name == "cuda" or _target_device(args[1:], kwargs) is not None
            out = func(*args, **kwargs)
            if moves and probe.is_host(source):
                if not kwargs.get("non_blocking", False) or not probe.pinned(source):
                    probe.sync("blocking_h2d")
                probe.forget_host(out)   # now the device's, even where it is the same object (the CPU)
            return out
        if name == "copy_" and len(args) > 1 and probe.is_host(args[1]) and not probe.is_host(args[0]):
            if not kwargs.get("non_blocking", False) or not probe.pinned(args[1]):
                probe.sync("blocking_h2d")
        elif name in _READS and args and isinstance(args[0], torch.Tensor) and not probe.is_host(args[0]):
            if name != "cpu" or args[0].device.type != "cpu" or probe.emulating:
                probe.sync(_READS[name])
        elif name in _FACTORIES and kwargs.get("device") is not None and not any(
                isinstance(a, torch.Tensor) for a in tree_leaves(args)):
            probe.sync("blocking_h2d")   # host numbers copied to the device, synchronously
        return func(*args, **kwargs)


def _target_device(args: tuple, kwargs: dict) -> Any:
    if kwargs.get("device") is not None:
        return kwargs["device"]
    for a in args:
        if isinstance(a, (str, torch.device)) or (isinstance(a, int) and not isinstance(a, bool)):
            return a
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class StepProbe:
    """Counts kernel launches and host syncs while `active()`; see the module's docstring.

    `device`: the training device. On "cpu" the host is emulated (`host_work`); on CUDA host
    memory is simply memory on the CPU."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.emulating = self.device.type == "cpu"
        self.launches = 0
        self.syncs: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self._host: dict[int, weakref.ref] = {}   # by id: a tensor's == is elementwise
        self._host_depth = 0
        self._on = False
        self._modes: list[Any] = []

    # -- what is the host's --------------------------------------------------------

    def counting(self) -> bool:
        return self._on and self._host_depth == 0

    def is_host(self, tensor: Any) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return False
        if self.emulating:
            return self._marked(tensor)
        return tensor.device.type == "cpu"

    def _marked(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def _mark(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        self._host[key] = weakref.ref(tensor, lambda _ref, key=key: self._host.pop(key, None))

    def pinned(self, tensor: torch.Tensor) -> bool:
        return self.emulating or tensor.is_pinned()

    def forget_host(self, value: Any) -> None:
        for leaf in tree_leaves(value):
            if isinstance(leaf, torch.Tensor) and self._marked(leaf):
                del self._host[id(leaf)]

    def on_device(self, args: tuple, kwargs: dict) -> bool:
        """Whether an operator works on device memory (on the CPU: anything not host-marked)."""
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if self.emulating:
            return not tensors or not all(self._marked(t) for t in tensors)
        return not tensors or any(t.device.type != "cpu" for t in tensors)

    @contextlib.contextmanager
    def host_work(self) -> Iterator[None]:
        """The host's own work (a collator building a batch): nothing inside is counted."""
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    def host_collator(self, collate: Callable) -> Callable:
        """`collate`, run as host work, its output marked as host memory."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.host_work():
                batch = collate(*args, **kwargs)
            if self.emulating:
                for leaf in tree_leaves(batch):
                    if isinstance(leaf, torch.Tensor):
                        self._mark(leaf)
            return batch

        return wrapped

    # -- counting ------------------------------------------------------------------

    def sync(self, kind: str) -> None:
        self.syncs[kind] += 1
        self.sites[f"{kind} at {_site()}"] += 1

    def start(self) -> None:
        """Begin counting (modes pushed on this thread's stacks; `stop` pops them)."""
        if self._on:
            return
        self._modes = [_Functions(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        self._on = True

    def stop(self) -> None:
        if not self._on:
            return
        self._on = False
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        self._modes = []

    @contextlib.contextmanager
    def active(self) -> Iterator["StepProbe"]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def reset(self) -> None:
        self.launches = 0
        self.syncs = Counter()
        self.sites = Counter()

    def snapshot(self) -> dict[str, Any]:
        return {"launches": self.launches, "syncs": sum(self.syncs.values()),
                "by_kind": {k: self.syncs[k] for k in SYNC_KINDS if self.syncs[k]},
                "sites": dict(self.sites.most_common(12))}


# Kernel launches as the CUDA runtime sees them: a compiled step's kernels and CUDA graph
# replays bypass the dispatcher, so on a GPU the launches are counted here instead.
CUDA_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


class CudaLaunches:
    """Counts CUDA kernel launches (and CUDA graph launches, one each) between `start` and
    `stop`, from torch.profiler's record of the runtime calls."""

    def __init__(self) -> None:
        self.launches = 0
        self._profile: Any = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self._profile.__enter__()

    def stop(self) -> None:
        if self._profile is None:
            return
        torch.cuda.synchronize()
        self._profile.__exit__(None, None, None)
        self.launches = sum(1 for e in self._profile.events() if e.name in CUDA_LAUNCHES)
        self._profile = None


def launch_counter(device: str) -> Any:
    """What counts a step's kernel launches on `device`: the CUDA runtime's calls on a GPU,
    the dispatcher's operators (`StepProbe`) on a CPU. Both have `start`, `stop`, `launches`."""
    return CudaLaunches() if str(device).startswith("cuda") else StepProbe(device)
