"""Per-tensor gradient, weight and update norms for every training step, at a small fixed cost.

Two implementations with one interface (``push()`` after each optimizer step, ``drain()`` for the
(steps, 3, n_tensors) norms [‖g_i‖, ‖w_i‖, ‖w_i − w_i,prev‖] of every step not yet returned):

``StepNorms`` (CPU, float32/float64, the C helper ``lossatlas._fastnorms`` built at install):
one pass in C per step reads each gradient and weight once, while they are still in cache,
accumulates the three squared norms (float32 weights: float32 partial sums over blocks of 256
elements, float64 across blocks; float64 weights: float64) and keeps the previous weights for the update.
A step costs one C call and no PyTorch kernel launch — on a small CPU model each launch costs
microseconds, which makes a per-tensor loop of telemetry expensive (benchmarks/bench_recorder.py).

``NormRing`` (accelerators, other dtypes, or no C helper): a step only copies the gradients and the
weights into a ring buffer (one fused ``_foreach_copy_``, no allocation, no host sync). Every
``depth`` steps one batched pass reduces the whole ring: the updates w_t − w_{t−1} are differences
of consecutive rows, and every norm comes from one ``vector_norm`` over fixed-size chunks (each
tensor is zero-padded to whole chunks), followed by a tiny chunk→tensor sum.

Both give the same ‖g_i‖, ‖w_i‖ and ‖w_i − w_i,prev‖ as a per-tensor loop, up to summation order.
The ring holds ``depth`` gradient rows and ``depth + 1`` weight rows on the parameters' device,
in float32 (float64 when a parameter is float64; bf16/fp16 weights are reduced in float32).
``depth`` shrinks with the model so the ring stays under ``budget_bytes``: 4 MiB on the CPU (it
stays in cache), 256 MiB on an accelerator (where kernel launches, not memory, are the cost).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

try:  # the optional C helper (setup.py); without it the ring buffer serves every case
    from lossatlas import _fastnorms
except ImportError:  # pragma: no cover - depends on the install
    _fastnorms = None

CHUNK = 256  # elements per chunk; tensors are padded to whole chunks
MAX_DEPTH = 64  # steps per batched reduction
BUDGET_BYTES = {"cpu": 4 * 2**20}  # a ring that stays in cache; accelerators: launches cost more than memory
BUDGET_BYTES_ACCELERATOR = 256 * 2**20


class NormRing:
    """Buffers (g_t, w_t) per step and reduces them in blocks to (steps, 3, n_tensors) norms.

    ``push()`` after each optimizer step (a missing ``.grad`` counts as zero); ``drain()`` returns
    the norms of every pushed step not yet returned, rows in step order: [‖g_i‖, ‖w_i‖,
    ‖w_i − w_i,prev‖], with NaN updates for the first step (there is no previous weight).

    Args:
        params: the live parameter tensors, all on one device.
        chunk: elements per chunk; each tensor is padded to whole chunks.
        budget_bytes: memory for the gradient and weight rings (None: ``BUDGET_BYTES`` per device type).
        max_depth: most steps buffered before a batched reduction.
    """

    def __init__(self, params: Sequence[Tensor], *, chunk: int = CHUNK, budget_bytes: int | None = None,
                 max_depth: int = MAX_DEPTH) -> None:
        self.params = list(params)  # the live tensors: copied under no_grad, never detached aliases
        device = self.params[0].device
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        sizes = [p.numel() for p in self.params]
        padded = [max(1, math.ceil(s / chunk)) * chunk for s in sizes]
        self.width = sum(padded)
        self.chunk = chunk
        itemsize = torch.empty((), dtype=dtype).element_size()
        if budget_bytes is None:
            budget_bytes = BUDGET_BYTES.get(device.type, BUDGET_BYTES_ACCELERATOR)
        self.depth = int(max(1, min(max_depth, budget_bytes // (2 * itemsize * self.width) - 1)))
        # chunk j belongs to tensor owner[j]: a (n_chunks, n_tensors) 0/1 matrix sums chunks per tensor
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(padded) // chunk)
        self._owner = torch.nn.functional.one_hot(owner, len(sizes)).to(device, dtype)
        self._grads = torch.zeros(self.depth, self.width, device=device, dtype=dtype)
        self._weights = torch.zeros(self.depth + 1, self.width, device=device, dtype=dtype)  # row 0: previous step
        offsets = [0, *torch.tensor(padded).cumsum(0).tolist()]
        # slot r: this step's gradient row r and weight row r + 1, as views shaped like the parameters
        self._slots = [self._views(self._grads[r], offsets) + self._views(self._weights[r + 1], offsets)
                       for r in range(self.depth)]
        self._zeros: dict[int, Tensor] = {}  # stand-ins for missing gradients, made when first needed
        self._filled = 0
        self._has_previous = False
        self._done: list[Tensor] = []

    def _views(self, row: Tensor, offsets: list[int]) -> list[Tensor]:
        return [row[o : o + p.numel()].view_as(p) for o, p in zip(offsets, self.params)]

    @staticmethod
    def supports(params: Sequence[Tensor]) -> bool:
        """One device, dense tensors: the layout the ring needs (else the Recorder loops per tensor)."""
        return bool(params) and len({p.device for p in params}) == 1 and all(p.layout == torch.strided for p in params)

    @torch.no_grad()
    def push(self) -> None:
        """Copy the parameters' current gradients and weights into the ring (reduced when it is full)."""
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            grads = [self._zero(i) if g is None else g for i, g in enumerate(grads)]
        torch._foreach_copy_(self._slots[self._filled], grads + self.params)  # one fused copy
        self._filled += 1
        if self._filled == self.depth:
            self._reduce()

    def _zero(self, i: int) -> Tensor:
        if i not in self._zeros:
            self._zeros[i] = torch.zeros_like(self.params[i])
        return self._zeros[i]

    @torch.no_grad()
    def drain(self) -> Tensor | None:
        """(steps, 3, n_tensors) norms of every step pushed since the last drain, or None."""
        if self._filled:
            self._reduce()
        if not self._done:
            return None
        out = torch.cat(self._done)
        self._done = []
        return out

    def _reduce(self) -> None:
        n, c = self._filled, self.chunk
        g = self._grads[:n].view(n, -1, c)
        w = self._weights[1 : n + 1].view(n, -1, c)
        d = (self._weights[1 : n + 1] - self._weights[:n]).view(n, -1, c)
        sq = torch.stack([torch.linalg.vector_norm(t, dim=-1) for t in (g, w, d)], dim=1).square_()
        norms = (sq @ self._owner).sqrt_()  # (n, 3, n_tensors): Σ over a tensor's chunks
        if not self._has_previous:
            norms[0, 2] = float("nan")
        self._done.append(norms)
        self._weights[0].copy_(self._weights[n])
        self._has_previous = True
        self._filled = 0


def norm_tracker(params: Sequence[Tensor]) -> "StepNorms | NormRing | None":
    """The fastest tracker for these parameters: StepNorms (CPU, C helper), else NormRing (one device), else None."""
    if StepNorms.supports(params):
        return StepNorms(params)
    if NormRing.supports(params):
        return NormRing(params)
    return None


_ROWS = 256  # rows of the host buffer that StepNorms fills before it grows


class StepNorms:
    """Per-step norms of CPU float32/float64 parameters by one C pass (``lossatlas._fastnorms``).

    Each ``push()`` hands the parameters to the C helper, which checks that every weight and
    gradient is a dense contiguous CPU tensor of the expected dtype and size, writes
    [‖g_i‖², ‖w_i‖², ‖w_i − w_i,prev‖²] into the next row of a float64 host buffer and overwrites its
    copy of the previous weights. A step where a tensor is not such a tensor (a sparse or strided
    gradient, a weight moved to another device) is done by a per-tensor PyTorch loop instead, with
    the same numbers. A missing gradient counts as zero; the first step's updates are NaN.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        if not self.supports(params):
            raise ValueError("StepNorms needs the C helper and dense contiguous CPU float32/float64 parameters "
                             "of one dtype; use NormRing")
        self.params = tuple(params)
        self.dtype = self.params[0].dtype
        self.sizes = tuple(p.numel() for p in self.params)
        self._itemsize = self.params[0].element_size()
        self._prev = torch.cat([p.detach().reshape(-1) for p in self.params])  # w_{t-1}, flat
        self._prev_address = self._prev.data_ptr()
        self._checked = [0] * len(self.params)  # weight addresses the C helper has checked (it fills them)
        self._buf = np.empty((_ROWS, len(self.params), 3))  # squared norms, one (n, 3) row per step, as C writes
        self._buf_address = self._buf.ctypes.data  # row r starts r·row_bytes further
        self._row_bytes = self._buf[0].nbytes
        self._capacity = _ROWS
        self._filled = 0
        self._has_previous = False  # the first pushed step has no previous weights: its updates are NaN

    @staticmethod
    def supports(params: Sequence[Tensor]) -> bool:
        """The C helper is built and every parameter is a dense contiguous CPU tensor of one float32/64 dtype."""
        params = list(params)
        return (_fastnorms is not None and bool(params)
                and params[0].dtype in (torch.float32, torch.float64)
                and all(p.layout == torch.strided and p.is_cpu and p.dtype == params[0].dtype and p.is_contiguous()
                        for p in params))

    def push(self) -> None:
        """Norms of the parameters' current gradients and weights, and of the update since the last push."""
        row = self._filled
        if row == self._capacity:
            self._buf = np.concatenate([self._buf, np.empty_like(self._buf)])
            self._buf_address, self._capacity = self._buf.ctypes.data, self._buf.shape[0]
        if not _fastnorms.step_norms(self.params, self.sizes, self._checked, self._prev_address,
                                     self._buf_address + row * self._row_bytes, self._itemsize, self.dtype):
            self._buf[row] = np.square(self._torch_pass()).T
        self._filled = row + 1

    @torch.no_grad()
    def _torch_pass(self) -> np.ndarray:
        """The same (3, n) norms by a PyTorch loop (any layout), updating the previous weights."""
        out = np.empty((3, len(self.params)))
        start = 0
        for i, (p, m) in enumerate(zip(self.params, self.sizes)):
            w = p.detach().reshape(-1).to("cpu", torch.float64)
            g = p.grad
            if g is not None and g.layout != torch.strided:
                g = g.to_dense()
            out[0, i] = 0.0 if g is None else float(torch.linalg.vector_norm(g.detach().to("cpu", torch.float64)))
            out[1, i] = float(torch.linalg.vector_norm(w))
            prev = self._prev[start : start + m]
            out[2, i] = float(torch.linalg.vector_norm(w - prev.to(torch.float64))) if w.numel() == m else float("nan")
            if w.numel() == m:
                prev.copy_(w)
            start += m
        return out

    def drain(self) -> Tensor | None:
        """(steps, 3, n_tensors) float64 norms of every step pushed since the last drain, or None."""
        if not self._filled:
            return None
        out = torch.from_numpy(np.sqrt(self._buf[: self._filled]).transpose(0, 2, 1).copy())  # (steps, 3, n)
        if not self._has_previous:
            out[0, 2] = float("nan")
            self._has_previous = True
        self._filled = 0
        return out
