"""Optional ``torch.compile`` of the image encoders (``train.compile``).

Half of an eager CPU training step is memory-bound passes that do no arithmetic: GroupNorm and
SiLU over the first stage's activations (8 channels x 32 x 32 x every image of every patient),
the cine encoder's circular padding, concatenations and layout copies along the cardiac cycle.
Inductor fuses them into the convolutions' neighbours. What is compiled is each outermost
:class:`~ccmr_core.models.blocks.Compilable` module: the cine encoder's slice features and the
LGE encoder whole, and where an encoder is not compilable as a whole (the CNN-LSTM baseline's
LSTM) its convolution stack. Image sizes are fixed by the ingest grid; the batch dimension is
left dynamic (a smaller last batch or an evaluation batch compiles no new kernels); heads,
pooling and losses stay eager, so nothing else in training changes. Compilation takes one to two
minutes per process on 2 CPU cores (forward + backward of each encoder, each stage, evaluation);
inductor's on-disk cache shortens later processes."""

from __future__ import annotations

import functools
import os
import shutil

import torch
from torch import nn

from ccmr_core.models.blocks import Compilable


class CompileUnavailable(RuntimeError):
    """train.compile was asked for where inductor cannot build kernels."""


@functools.cache
def _compiled_runner():
    # one compiled graph per encoder, image depth (cine slices x frames, LGE slices), stage (which
    # weights train) and mode (training, evaluation): more than dynamo's default of 8 in one
    # process that trains several models (benchmarks); past the limit it would run eager without a word
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    run = torch.compile(lambda fn, x: fn(x), dynamic=False)

    def forward(fn, x: torch.Tensor):
        torch._dynamo.maybe_mark_dynamic(x, 0)  # patients per batch vary; the image grid does not
        return run(fn, x)

    return forward


def compilable_units(model: nn.Module) -> list[Compilable]:
    """The outermost compilable modules of ``model`` (an encoder, not also its convolution stack)."""
    units: list[tuple[str, Compilable]] = []
    for name, m in model.named_modules():
        if isinstance(m, Compilable) and not any(name.startswith(f"{u}.") or not u for u, _ in units):
            units.append((name, m))
    return [m for _, m in units]


def compile_encoders(model: nn.Module, device: torch.device) -> int:
    """Route every outermost compilable module of ``model`` through one compiled function
    (weights, state dict and outputs unchanged up to float rounding). Returns how many."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++")
                                        if c):
        raise CompileUnavailable("train.compile needs a C++ compiler for CPU kernels (inductor) and none was found "
                                 "(g++, clang++, c++ or $CXX): install one (e.g. apt install g++) or set "
                                 "train.compile to false")
    units = compilable_units(model)
    run = _compiled_runner()
    for m in units:
        m.runner = run
    return len(units)
