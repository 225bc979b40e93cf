"""The C++ CPU kernels (engine/layers/csrc): the bfloat16 linear against float32 math, the attention kernel
against the reference attention on random steps, and the engine using both against transformers' own forward.
Skipped on CPUs without AVX512-BF16, where the engine does not use them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from engine import Engine
from engine.layers.attention import CpuAttention
from engine.layers.backends import ATTENTION_BACKENDS, resolve_attention
from engine.layers.cpu_kernels import build_dir, load_cpu_kernels
from engine.layers.linear import KERNEL_MAX_ROWS, Linear
from tests.attention_cases import CASES, compare, random_step
from tests.models import tiny_model
from tests.test_oracle import check_against_reference

pytestmark = pytest.mark.skipif(not load_cpu_kernels(), reason="needs AVX512-BF16 and a C++ compiler")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 33])
@pytest.mark.parametrize(("n_in", "n_out"), [(576, 960), (1536, 576), (32, 4), (4096, 12)])
def test_linear_matches_float32_math(rows: int, n_in: int, n_out: int) -> None:
    gen = torch.Generator().manual_seed(rows * n_in + n_out)
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    w = torch.randn(n_out, n_in, generator=gen).bfloat16()
    actual = torch.ops.hogwild_cpu.linear_bf16(x, w).float()
    expected = F.linear(x.float(), w.float())
    # Sums of n_in products accumulated in float32 then rounded once: within a bfloat16 rounding.
    torch.testing.assert_close(actual, expected, rtol=2**-7, atol=1e-3 * n_in**0.5)


def test_linear_rejects_what_it_cannot_do() -> None:
    x = torch.randn(2, 48).bfloat16()
    with pytest.raises(RuntimeError, match="k % 32"):
        torch.ops.hogwild_cpu.linear_bf16(x, torch.randn(8, 48).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.hogwild_cpu.linear_bf16(x.float(), torch.randn(8, 48))


def test_linear_layer_sends_decode_rows_to_the_kernel_and_prefill_rows_to_torch() -> None:
    layer = Linear(64, 8, bias=True).bfloat16()
    assert layer.fits_kernel()
    calls: list[int] = []

    def kernel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return torch.ops.hogwild_cpu.linear_bf16(x, w)

    layer.kernel = kernel
    for rows in (1, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1):
        x = torch.randn(rows, 64).bfloat16()
        expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)
    assert calls == [1, KERNEL_MAX_ROWS]
    assert not Linear(64, 8).fits_kernel()  # float32
    assert not Linear(60, 8).bfloat16().fits_kernel()


@pytest.mark.parametrize(("head_dim", "heads", "kv_heads", "workers", "prefill"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_reference(
    head_dim: int, heads: int, kv_heads: int, workers: list[int], prefill: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(head_dim + sum(workers))
    kernel = CpuAttention(chunk=16, tile_tokens=8)  # small, so that pieces, items and merges multiply
    compare(kernel, random_step(workers, gen, prefill), heads, kv_heads, head_dim, dtype, gen)


def test_auto_picks_the_kernel_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, torch.bfloat16, 64) == "cpu"
    assert resolve_attention("auto", cpu, torch.float32, 128) == "cpu"
    assert resolve_attention("auto", cpu, torch.float16, 64) == "vectorized"
    assert resolve_attention("auto", cpu, torch.float32, 40) == "vectorized"
    assert resolve_attention("auto", cpu, torch.bfloat16, 64, cpu_kernels=False) == "vectorized"
    assert isinstance(ATTENTION_BACKENDS["cpu"](), CpuAttention)


def test_engine_with_the_kernels_matches_reference(tok: Any) -> None:
    model = tiny_model("llama-gqa4", tok)
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=4096, prefill_chunk=96)
    assert eng.options.attention == "cpu"
    job = eng.generate("Add 2 and 3.", workers=3, max_tokens=16, finisher=False, trace=True)
    assert check_against_reference(model, job) >= 12 * 3
    assert any(s.rollovers for s in job.trace)  # headers: rows of several tokens


def test_bfloat16_engine_uses_the_linear_kernel_and_agrees_with_torch(tok: Any) -> None:
    """Same greedy tokens with and without the kernels on a bfloat16 model (they round alike)."""
    model = torch.nn.Module.to(tiny_model("llama-gqa4", tok), torch.bfloat16)
    texts = []
    for kernels in (True, False):
        eng = Engine.from_hf(model, tok, page_size=4, num_pages=4096, cpu_kernels=kernels)
        uses = [m.kernel is not None for m in eng.model.modules() if isinstance(m, Linear)]
        assert all(uses) if kernels else not any(uses)
        job = eng.generate("Add 2 and 3.", workers=2, max_tokens=12, finisher=False)
        texts.append(job.transcript)
    assert texts[0] == texts[1]


def test_a_build_killed_half_way_does_not_block_the_next_start(tmp_path: Any) -> None:
    """torch's build lock is a plain file: a process killed while building left it behind, and every later
    start then waited on it forever."""
    from engine.loader import cache_dir

    build = build_dir().relative_to(cache_dir())
    shutil.copytree(cache_dir() / build, tmp_path / build)  # built already: loading is all that is left
    (tmp_path / build / "lock").touch()
    code = "from engine.layers.cpu_kernels import build_dir, load_cpu_kernels; print(load_cpu_kernels())"
    env = os.environ | {"HOGWILD_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
