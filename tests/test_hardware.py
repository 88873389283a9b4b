"""engine.attention: which kernel a step runs, that the math and flash kernels agree, and that the manual kernel
(auto on a CPU under bf16) gives SDPA's output and gradients without running SDPA."""

from __future__ import annotations

import pytest
import torch

from orchestrator.worker.hardware import attention_context, attention_kernel


def test_auto_picks_manual_only_for_bf16_on_cpu():
    assert attention_kernel("auto", "cpu", bf16=True) == "manual"
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
    """TorchEngine.forward runs the model inside the SDPA kernel the plan resolved (math, asked for by name)."""
    from conftest import compose

    from orchestrator.driver import make_plan
    from orchestrator.worker.engine import build_engine

    run_dir = tmp_path / "run"
    cfg = compose(["launcher=local", "compute=cpu1", "engine=torch", "engine.bf16=true", "engine.attention=math",
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


def _attention_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g).to(dtype) for _ in range(3))
    seg = torch.tensor([[0] * 10 + [1] * 6, [0] * 13 + [1] * 3])
    return q, k, v, (seg[:, None, :, None] == seg[:, None, None, :])  # block-diagonal, as packed rows use


@pytest.mark.parametrize("masked", ["bool", "additive", "none"])
def test_manual_attention_matches_sdpa_in_fp32_within_bf16_rounding(masked):
    """The manual path (bf16 inputs on a CPU) against SDPA's math kernel on the same values in fp32: output and
    the three input gradients, with a boolean block-diagonal mask, the same mask additive, and no mask."""
    import torch.nn.functional as F

    from orchestrator.model.attention import cpu_bf16_attention_forward

    q, k, v, mask = _attention_inputs(torch.bfloat16)
    if masked == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    elif masked == "none":
        mask = None
    module = torch.nn.Module()
    module.is_causal = False
    qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
    out, _ = cpu_bf16_attention_forward(module, qb, kb, vb, mask)  # [B, T, H, D]
    assert out.dtype == torch.bfloat16
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    with attention_context("math"):
        ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask).transpose(1, 2)
    (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for got, want in ((qb.grad, qf.grad), (kb.grad, kf.grad), (vb.grad, vf.grad)):
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_manual_attention_passes_anything_else_to_sdpa():
    """fp32 inputs (evaluation without autocast) and causal attention take transformers' SDPA function."""
    from torch.profiler import profile

    from orchestrator.model.attention import cpu_bf16_attention_forward

    module = torch.nn.Module()
    module.is_causal = False
    for dtype, causal in ((torch.float32, None), (torch.bfloat16, True)):
        q, k, v, mask = _attention_inputs(dtype)
        with profile() as prof:
            cpu_bf16_attention_forward(module, q, k, v, None if causal else mask, is_causal=causal)
        assert "aten::scaled_dot_product_attention" in {e.key for e in prof.key_averages()}, (dtype, causal)


def test_engine_runs_a_bert_under_bf16_on_the_manual_kernel_with_the_math_kernels_loss(tmp_path):
    """On a CPU under bf16, `engine.attention=auto` switches the model to the manual attention function: no SDPA op
    runs in its forward, its loss and gradients match `engine.attention=math` (same weights, same packed batch),
    and the saved config does not carry the in-memory attention name."""
    from conftest import compose
    from torch.profiler import profile

    from orchestrator.driver import make_plan
    from orchestrator.model.attention import NAME
    from orchestrator.model.build import build_pretraining_model
    from orchestrator.worker.engine import build_engine

    seg = torch.tensor([[0] * 20 + [1] * 12, [0] * 25 + [1] * 7])
    ids = torch.randint(5, 90, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, 3::5] = ids[:, 3::5]
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
             "position_ids": torch.cat([torch.arange(20), torch.arange(12)]).repeat(2, 1),
             "attention_mask": seg[:, None, :, None] == seg[:, None, None, :], "mlm_labels": labels}
    runs = {}
    for kernel in ("auto", "math"):
        run_dir = tmp_path / kernel
        cfg = compose(["launcher=local", "compute=cpu1", "engine=torch", "engine.bf16=true", "model=tiny",
                       f"engine.attention={kernel}", "train.max_steps=2", f"hydra.run.dir={run_dir}"])
        plan, _ = make_plan(cfg, run_dir=str(run_dir), prepare=False)
        model = build_pretraining_model(cfg.model, 100, 0, nsp=False, seed=0)
        engine = build_engine(model, plan, torch.device("cpu"))
        with profile() as prof:
            loss = engine.forward(**batch)["loss"]
        loss.backward()
        ops = {e.key for e in prof.key_averages()}
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        runs[kernel] = (engine.attention, model.hf.config._attn_implementation, ops, float(loss.detach()), grads)
        model.hf.save_pretrained(run_dir / "export")
        assert NAME not in (run_dir / "export" / "config.json").read_text()
    (k_auto, impl_auto, ops_auto, loss_auto, g_auto), (k_math, impl_math, ops_math, loss_math, g_math) = (
        runs["auto"], runs["math"])
    assert (k_auto, impl_auto) == ("manual", NAME) and (k_math, impl_math) == ("math", "sdpa")
    assert "aten::scaled_dot_product_attention" not in ops_auto and "aten::scaled_dot_product_attention" in ops_math
    assert loss_auto == pytest.approx(loss_math, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(g_auto, g_math, dim=0) > 0.99


def test_the_manual_kernel_reaches_a_distillations_teacher():
    """The frozen teacher is kept out of the student's module tree, and is switched too."""
    from orchestrator.config.schema import ModelConfig
    from orchestrator.model.attention import NAME, use_cpu_bf16_attention
    from orchestrator.model.build import build_pretraining_model
    from orchestrator.model.distill import DistillModel

    def tiny(layers):
        cfg = ModelConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=64)
        return build_pretraining_model(cfg, 100, 0, nsp=False, seed=0)

    model = DistillModel(tiny(1), tiny(2), pad_id=0, temperature=2.0, alpha_kl=1.0, alpha_mlm=0.0, alpha_cos=0.0)
    assert model.teacher not in list(model.modules())
    assert use_cpu_bf16_attention(model)
    assert model.student.hf.config._attn_implementation == NAME
    assert model.teacher.hf.config._attn_implementation == NAME
