"""engine.attention: which SDPA kernel a step runs, and that the math and flash kernels agree."""

from __future__ import annotations

import pytest
import torch

from orchestrator.worker.hardware import attention_context, attention_kernel


def test_auto_picks_math_only_for_bf16_on_cpu():
    assert attention_kernel("auto", "cpu", bf16=True) == "math"
    assert attention_kernel("auto", "cpu", bf16=False) == "default"
    assert attention_kernel("auto", "cuda", bf16=True) == "default"
    assert attention_kernel("flash", "cpu", bf16=True) == "flash"


def _sdpa_ops(kernel: str, dtype: torch.dtype) -> tuple[set[str], torch.Tensor]:
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g).to(dtype).requires_grad_() for _ in range(3))
    seg = torch.tensor([[0] * 10 + [1] * 6, [0] * 16])
    mask = (seg[:, None, :, None] == seg[:, None, None, :])  # block-diagonal, as packed rows use
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with attention_context(kernel):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.float().sum().backward()
    return {e.key for e in prof.key_averages()}, torch.cat([out.detach().float().flatten(), q.grad.float().flatten()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_math_kernel_is_the_one_run_and_matches_flash(dtype):
    ops_math, math = _sdpa_ops("math", dtype)
    ops_flash, flash = _sdpa_ops("flash", dtype)
    flash_op = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert flash_op in ops_flash and flash_op not in ops_math
    assert "aten::bmm" in ops_math or "aten::matmul" in ops_math
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(math, flash, atol=tol, rtol=tol)


def test_engine_forward_uses_the_resolved_kernel(tmp_path):
    """TorchEngine.forward runs the model inside the kernel the plan resolved (math under bf16 on CPU)."""
    from conftest import compose

    from orchestrator.driver import make_plan
    from orchestrator.worker.engine import build_engine

    run_dir = tmp_path / "run"
    cfg = compose(["launcher=local", "compute=cpu1", "engine=torch", "engine.bf16=true",
                   "train.max_steps=2", f"hydra.run.dir={run_dir}"])
    plan, _ = make_plan(cfg, run_dir=str(run_dir), prepare=False)
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, **_):
            q = torch.randn(1, 1, 4, 8)
            with torch.profiler.profile() as prof:
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            seen.append({e.key for e in prof.key_averages()})
            return {"loss": self.lin(torch.ones(2)).sum()}

    engine = build_engine(Probe(), plan, torch.device("cpu"))
    assert engine.attention == "math"
    engine.forward()
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in seen[0]
