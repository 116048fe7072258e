"""Optional ``torch.compile`` of the image encoders' convolution stacks (``train.compile``).

Half of a CPU training step is GroupNorm and SiLU over the first stage's activations (8 channels
x 32 x 32 x every image of every patient): memory-bound passes that inductor fuses into the
convolutions' neighbours. Only the :class:`FrameEncoder` stacks are compiled: their image sizes
are fixed by the ingest grid, the batch dimension is left dynamic (a smaller last batch or an
evaluation batch compiles no new kernels), and the rest of the model (losses, pooling, heads)
stays eager, so nothing else in training changes. Compilation takes about a minute per process
on 2 CPU cores (forward + backward, the student stage and evaluation once each); inductor's
on-disk cache shortens later processes."""

from __future__ import annotations

import functools
import os
import shutil

import torch
from torch import nn

from ccmr_core.models.blocks import FrameEncoder


class CompileUnavailable(RuntimeError):
    """train.compile was asked for where inductor cannot build kernels."""


@functools.cache
def _compiled_stack():
    # one compiled graph per image depth (cine slices x frames, LGE slices), stage (which weights
    # train) and mode (training, evaluation): more than dynamo's default of 8 in one process that
    # trains several models (benchmarks); past the limit it would run eager without a word
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    run = torch.compile(lambda body, x: body(x), dynamic=False)

    def forward(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(x, 0)  # patients per batch vary; the image grid does not
        return run(body, x)

    return forward


def compile_encoders(model: nn.Module, device: torch.device) -> int:
    """Route every convolution stack of ``model`` through one compiled function (weights, state
    dict and outputs unchanged up to float rounding). Returns how many stacks were routed."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++")
                                        if c):
        raise CompileUnavailable("train.compile needs a C++ compiler for CPU kernels (inductor) and none was found "
                                 "(g++, clang++, c++ or $CXX): install one (e.g. apt install g++) or set "
                                 "train.compile to false")
    stacks = [m for m in model.modules() if isinstance(m, FrameEncoder)]
    run = _compiled_stack()
    for m in stacks:
        m.runner = run
    return len(stacks)
