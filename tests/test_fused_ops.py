"""The fused small ops against the torch ops they replace (engine/layers/ops.py): Triton's
(engine/layers/triton_ops.py) in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set by
tests/conftest.py) or compiled on a GPU with ``TRITON_INTERPRET=0``, and the C++ kernels' (csrc/ops.cpp)
where they build. In 16-bit dtypes the kernels round where the torch ops round, so almost every element is
bit-identical; the rest differ by float32 summation order, at most one unit in the last place. The engine
with these ops is checked against transformers in tests/test_triton_attention.py and tests/test_oracle.py.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from engine import Engine
from engine.layers.backends import triton_ops
from engine.layers.cpu_kernels import load_cpu_kernels
from engine.layers.ops import CpuOps, TorchOps
from engine.layers.rotary import Rotary
from engine.models.llama import Attention, ModelShape
from engine.models.step_inputs import StepInputs
from tests.models import random_model

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
HAS_TRITON = importlib.util.find_spec("triton") is not None and (INTERPRET or torch.cuda.is_available())
# The fused implementations, by the attention backend that brings them, and where each runs.
OPS: dict[str, Callable[[], TorchOps]] = {"triton": triton_ops, "cpu": CpuOps}
IMPLEMENTATIONS = [
    pytest.param("triton", TRITON_DEVICE, marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
    pytest.param("cpu", "cpu", marks=pytest.mark.skipif(not load_cpu_kernels(), reason="no C++ kernels")),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: in 16-bit dtypes, nearly all bits equal and the rest a few ulps off."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        return
    # A norm's float32 sum in another order can flip one rounding, which its weight (up to about 10 here) and
    # RoPE's products carry on: a few ulps, rarely. A rounding in the wrong place would make many differ.
    ulp = torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual.float(), expected.float(), atol=ulp, rtol=8 * ulp)
    assert (actual == expected).float().mean() > 0.995


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).mul(3).to(device, dtype)


@pytest.mark.parametrize(("fused", "device"), IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "width"), [(1, 64), (5, 576), (37, 96), (3, 5120)])
def test_rms_norm_and_residual_add(
    fused: str, device: str, dtype: torch.dtype, rows: int, width: int
) -> None:
    gen = torch.Generator().manual_seed(rows * width)
    x, residual = randn(2, rows, width, dtype=dtype, gen=gen, device=device)
    weight = randn(width, dtype=dtype, gen=gen, device=device)
    torch_ops, ops = TorchOps(), OPS[fused]()
    same(ops.rms_norm(x, weight, 1e-6), torch_ops.rms_norm(x, weight, 1e-6))
    out, summed = ops.add_rms_norm(x, residual, weight, 1e-5)
    expected_out, expected_sum = torch_ops.add_rms_norm(x, residual, weight, 1e-5)
    same(summed, expected_sum)
    same(out, expected_out)


@pytest.mark.parametrize(("fused", "device"), IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "width"), [(1, 64), (6, 1536), (19, 200)])
def test_silu_mul(fused: str, device: str, dtype: torch.dtype, rows: int, width: int) -> None:
    gen = torch.Generator().manual_seed(rows + width)
    gate_up = randn(rows, 2 * width, dtype=dtype, gen=gen, device=device)
    same(OPS[fused]().silu_mul(gate_up), TorchOps().silu_mul(gate_up))


@pytest.mark.filterwarnings(
    "ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning"
)  # numpy's
@pytest.mark.parametrize(("fused", "device"), IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_values_come_out_as_in_torch(fused: str, device: str, dtype: torch.dtype) -> None:
    """SiLU of a large negative gate is -0 (its exp overflows), an inf in a row comes out of the norm as a
    NaN there and zeros elsewhere, and a NaN makes its row NaN, as with the torch ops."""
    ops, reference = OPS[fused](), TorchOps()
    gate = torch.tensor([-200.0, -100.0, -90.0, -88.0, 0.0, 88.0, 100.0, 200.0] * 4)
    gate_up = torch.cat([gate, torch.ones_like(gate)])[None].to(device, dtype)
    torch.testing.assert_close(ops.silu_mul(gate_up), reference.silu_mul(gate_up), rtol=0, atol=0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    x[1, 5], x[2, 7] = float("inf"), float("nan")
    x, weight = x.to(device, dtype), torch.ones(64, device=device, dtype=dtype)
    ulp = torch.finfo(dtype).eps
    for actual, expected in [
        (ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)),
        (ops.add_rms_norm(x, x, weight, 1e-6)[0], reference.add_rms_norm(x, x, weight, 1e-6)[0]),
    ]:
        torch.testing.assert_close(actual, expected, atol=ulp, rtol=2 * ulp, equal_nan=True)
        assert actual[1].isnan().sum() == 1 and actual[2].isnan().all()


def shape_of(heads: int, kv_heads: int, head_dim: int, qk_norm: bool) -> ModelShape:
    return ModelShape(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=64,
        num_layers=2,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        qkv_bias=False,
        qk_norm=qk_norm,
        tie_embeddings=True,
        max_positions=4096,
    )


def step_inputs(
    rows: int, shape: ModelShape, dtype: torch.dtype, gen: torch.Generator, device: str
) -> StepInputs:
    """A step's RoPE tables and pool slots, with pools laid out head-major as the model runner's are."""
    slots = 64
    size = (shape.num_layers, shape.num_kv_heads, slots, shape.head_dim)
    k_pool, v_pool = (randn(*size, dtype=dtype, gen=gen, device=device).transpose(1, 2) for _ in range(2))
    rotary = Rotary(LlamaConfig(head_dim=shape.head_dim), shape.head_dim, torch.device(device))
    (q_cos, q_sin), (k_cos, k_sin) = (
        rotary.cos_sin(torch.randint(0, 4000, (rows,), generator=gen).to(device), scaled=True)
        for _ in range(2)
    )
    return StepInputs(
        write_slots=torch.randperm(slots, generator=gen)[:rows].to(device),
        q_cos=q_cos[:, None].to(dtype),
        q_sin=q_sin[:, None].to(dtype),
        k_cos=k_cos[:, None].to(dtype),
        k_sin=k_sin[:, None].to(dtype),
        k_pool=k_pool,
        v_pool=v_pool,
        attention=None,
        plan=None,
        ops=TorchOps(),
    )


@pytest.mark.parametrize(("fused", "device"), IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "heads", "kv_heads", "head_dim", "qk_norm"),
    [(1, 4, 2, 64, False), (4, 8, 2, 128, True), (21, 6, 3, 80, True), (3, 2, 2, 16, False)],
)
def test_qkv_epilogue(
    fused: str,
    device: str,
    dtype: torch.dtype,
    rows: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    qk_norm: bool,
) -> None:
    """Queries out, keys and values into their pool slots (only there), for a layer past the first."""
    gen = torch.Generator().manual_seed(rows * heads + head_dim)
    shape = shape_of(heads, kv_heads, head_dim, qk_norm)
    attn = Attention(shape).to(device, dtype)
    if attn.q_norm is not None and attn.k_norm is not None:
        attn.q_norm.weight.data = randn(head_dim, dtype=dtype, gen=gen, device=device)
        attn.k_norm.weight.data = randn(head_dim, dtype=dtype, gen=gen, device=device)
    qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, gen=gen, device=device)
    step = step_inputs(rows, shape, dtype, gen, device)

    def run(ops: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k_pool, v_pool = step.k_pool.clone(), step.v_pool.clone()
        mine = StepInputs(**{**vars(step), "k_pool": k_pool, "v_pool": v_pool})
        with torch.inference_mode():
            q = ops.qkv_epilogue(qkv, attn, 1, mine)
        return q, k_pool, v_pool

    q, k_pool, v_pool = run(OPS[fused]())
    expected_q, expected_k, expected_v = run(TorchOps())
    same(q, expected_q)
    same(k_pool, expected_k)
    assert torch.equal(v_pool, expected_v)
    assert not torch.equal(k_pool[1], step.k_pool[1]) and torch.equal(k_pool[0], step.k_pool[0])


# Ops that launch no kernel (views, allocations), and under Triton's interpreter the copies it makes of each
# argument.
NOT_KERNELS = {
    "aten.view", "aten.reshape", "aten.select", "aten.slice", "aten.unsqueeze", "aten.transpose", "aten.t",
    "aten.expand", "aten.alias", "aten.detach", "aten.result_type", "aten.empty", "aten.new_empty",
    "aten.empty_like",
} | ({"aten.set_", "aten.copy_"} if INTERPRET else set())  # fmt: skip


class CountOps(TorchDispatchMode):
    """The torch ops a forward dispatches that launch a kernel, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        if name not in NOT_KERNELS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def decode_step_ops(
    tok: Any, layers: int, attention: str, device: str, fused_ops: bool = True
) -> Counter[str]:
    """The torch ops of one decode forward of a 2-worker Qwen3-style job (q/k norms) on ``layers`` layers."""
    model = random_model("qwen3-qknorm", len(tok), num_hidden_layers=layers)
    options = {"page_size": 4, "num_pages": 1024, "cuda_graphs": False}  # graphs replay without dispatching
    eng = Engine.from_hf(model, tok, device=device, attention=attention, fused_ops=fused_ops, **options)
    job = eng.submit("Add 2 and 3.", workers=2, max_tokens=32, finisher=False, instructions="none")
    while job.status != "running":  # past the prefill and the static header blocks
        eng.step()
    eng.step()  # the openers
    forward, counted = eng.runner.forward, CountOps()

    def counting(batch: Any) -> torch.Tensor:
        with counted:
            return forward(batch)

    eng.runner.forward = counting  # type: ignore[method-assign]
    eng.step()
    return counted.ops


FUSED_LAYER = {
    # Triton kernels do not go through torch's dispatcher: only the matmuls are left.
    "triton": Counter({"aten.linear": 4}),
    "cpu": Counter(
        {
            "aten.linear": 4,  # the tiny models are float32: the bfloat16 linear kernel does not apply
            "hogwild_cpu.add_rms_norm": 2,
            "hogwild_cpu.qkv_epilogue": 1,
            "hogwild_cpu.attention": 1,
            "hogwild_cpu.silu_mul": 1,
        }
    ),
}


@pytest.mark.parametrize(("fused", "device"), IMPLEMENTATIONS)
def test_a_fused_layer_is_its_matmuls_and_one_kernel_per_op(tok: Any, fused: str, device: str) -> None:
    """With a fused attention, a layer's norms, activation, RoPE and pool writes are one kernel each: per
    layer a decode step adds its four matmuls (q/k/v, o, gate/up, down) and those kernels. With the
    vectorized attention and the torch ops, a layer adds about ninety torch ops, each a kernel launch on a
    GPU; with ``fused_ops=False`` the fused attention keeps the torch ops."""
    layer = decode_step_ops(tok, 3, fused, device) - decode_step_ops(tok, 2, fused, device)
    assert layer == FUSED_LAYER[fused]
    unfused_ops = decode_step_ops(tok, 3, fused, device, False) - decode_step_ops(
        tok, 2, fused, device, False
    )
    assert unfused_ops["aten.rsqrt"] == 4 and unfused_ops.total() > 25  # fused_ops=False: the attention alone
    unfused = decode_step_ops(tok, 3, "vectorized", "cpu") - decode_step_ops(tok, 2, "vectorized", "cpu")
    assert unfused["aten.linear"] == 4 and unfused.total() > 30
