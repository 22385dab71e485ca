"""Device placement: every stage and `vla eval` compute where their model is.

On the CPU the placement is shown with PyTorch's "meta" device (tensors without data: any
operation that mixes a meta and a CPU tensor fails as a CUDA/CPU mix would). The `cuda`-marked
tests run the same paths on a GPU; `make gpu-check` runs them, and they skip elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vla.models.proclip.adapter import Adapter, AdapterConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_NO_PROGRESS": "1"}


def _features(n=16, d_in=32, d_out=8):
    g = torch.Generator().manual_seed(0)
    return {"phi.short": torch.randn(n, d_in, generator=g), "teacher.short": torch.randn(n, d_out, generator=g)}


def test_distill_agreement_computes_on_the_adapters_device():
    """Before, agreement() fed CPU features to an adapter the loop had moved to the GPU."""
    from vla.stages.distill import agreement_tensors

    adapter = Adapter.from_config(AdapterConfig.proclip(32, 8)).to("meta")
    cosine, top1, rows = agreement_tensors(adapter, _features(), slice(4, None))
    assert cosine.device.type == top1.device.type == "meta" and rows == 12


def test_encoders_place_every_network_on_the_device_asked():
    """`vla eval` loads each model onto its device: every parameter of a CLIP, and of a ProCLIP
    model's CLIP, embedder and adapter, goes there."""
    from vla.models.clip import load_clip
    from vla.models.embedder import load_embedder
    from vla.models.load import load_encoder
    from vla.models.proclip import ProCLIPModel

    clip = load_encoder("vla-micro-clip", device="meta")
    assert {p.device.type for p in clip.model.parameters()} == {"meta"}
    embedder = load_embedder("vla-tiny-qwen")
    model = ProCLIPModel(load_clip("vla-micro-clip"), embedder,
                         Adapter.from_config(AdapterConfig.proclip(embedder.dim, 32))).to("meta")
    for net in (model.clip.model, model.embedder.model, model.adapter):
        assert {p.device.type for p in net.parameters()} == {"meta"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_eval_device_comes_from_the_recipe(tmp_path):
    """`vla eval` resolves its recipe's device (auto: the GPU when present) before anything else."""
    proc = subprocess.run([sys.executable, "-m", "vla", "eval", "vla-micro-clip", "--data", str(tmp_path / "sets"),
                           "--out", str(tmp_path / "ev"), "--set", "device=cuda"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "device 'cuda' requested but no GPU" in proc.stderr


# --- on a GPU (make gpu-check) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "world"
    subprocess.run([sys.executable, "-m", "vla", "synth", "--out", str(out), "--recipe", "recipes/smoke/synth.yaml"],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    return out


def _vla(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "vla", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


@pytest.mark.cuda
def test_distill_then_contrast_tune_with_eval_then_eval_on_cuda(world, tmp_path):
    """The three crashes of issue #10 item 2: distill's agreement, contrast-tune's eval and
    `vla eval` all on the GPU, in bf16 where the recipe trains in bf16."""
    bf16 = ["--set", "train.precision=bf16"]
    _vla("distill", "--data", str(world), "--teacher", "vla-micro-clip", "--embedder", "vla-tiny-qwen",
         "--out", str(tmp_path / "distill"), "--recipe", "recipes/smoke/proclip/distill.yaml",
         "--set", "embedder.max_length=64", *bf16)
    distill = _manifest(tmp_path / "distill")
    assert distill["device"].startswith("cuda") and distill["metrics"]["val"]["rows"] > 0
    _vla("contrast-tune", "--data", str(world), "--init", str(tmp_path / "distill"),
         "--out", str(tmp_path / "contrast"), "--recipe", "recipes/smoke/proclip/contrast-tune.yaml",
         "--set", "eval.sets=[retrieval]", "--set", "train.grad_checkpointing=true", *bf16)
    contrast = _manifest(tmp_path / "contrast")
    assert contrast["device"].startswith("cuda") and "retrieval" in contrast["metrics"]["eval"]
    _vla("eval", str(tmp_path / "contrast"), "vla-micro-clip", "--data", str(world), "--out", str(tmp_path / "ev"),
         "--recipe", "recipes/smoke/proclip/eval.yaml")
    assert _manifest(tmp_path / "ev")["device"].startswith("cuda")


@pytest.mark.cuda
def test_agreement_and_encoders_on_cuda_match_the_cpu():
    from vla.models.clip import load_clip
    from vla.models.embedder import load_embedder
    from vla.models.proclip import ProCLIPModel
    from vla.stages.distill import agreement
    from PIL import Image

    torch.manual_seed(0)
    adapter = Adapter.from_config(AdapterConfig.proclip(32, 8))
    feats = _features()
    cpu = agreement(adapter, feats, slice(4, None))
    gpu = agreement(adapter.cuda(), feats, slice(4, None))
    assert gpu["rows"] == cpu["rows"] and abs(gpu["cosine"] - cpu["cosine"]) < 1e-4
    embedder = load_embedder("vla-tiny-qwen")
    torch.manual_seed(0)
    model = ProCLIPModel(load_clip("vla-micro-clip"), embedder,
                         Adapter.from_config(AdapterConfig.proclip(embedder.dim, 32)))
    images = [Image.new("RGB", (40, 40), (i * 40, 0, 0)) for i in range(3)]
    texts = ["a red circle", "two yellow stars above a purple rectangle"]
    want = model.encode_image(images), model.encode_text(texts)
    model.to("cuda")
    got = model.encode_image(images), model.encode_text(texts)
    for g, w in zip(got, want):
        assert g.device.type == "cpu" and torch.allclose(g, w, atol=5e-3)


@pytest.mark.cuda
def test_bf16_autocast_step_on_cuda(tmp_path):
    """One contrast-tune step of the real loop in bf16 autocast: finite loss, fp32 master weights."""
    from vla.losses import ClipLoss, LogitScale
    from vla.models.clip import load_clip
    from vla.models.proclip import ImageTextAligner
    from vla.train import TrainConfig, train

    torch.manual_seed(0)
    visual = load_clip("vla-micro-clip").model.visual
    model = ImageTextAligner(visual, Adapter.from_config(AdapterConfig.llm2clip(16, 32)), LogitScale()).train()
    loss_fn = ClipLoss()
    seen = []

    def step(m, batch):
        img, txt, scale, _ = m(batch["image"], batch["phi"])
        seen.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
        return {"loss": loss_fn(img, txt, scale)}

    def batches(_start):
        while True:
            yield {"image": torch.randn(8, 3, 32, 32), "phi": torch.randn(8, 16)}

    result = train(TrainConfig(steps=3, warmup_steps=0, precision="bf16", device="cuda"), model, step, batches,
                   tmp_path)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert set(seen) == {(True, torch.bfloat16)}  # every step ran under bf16 autocast
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cuda"}


def test_uint8_images_normalised_on_the_device_are_the_float_transforms_pixels():
    """pretrain and contrast-tune hand uint8 images from the workers; the tower's pre-hook makes
    them exactly what the float transform gives (same crop: the same seeded draws), and leaves
    float inputs (evaluation's preprocessing) alone."""
    import copy

    import numpy as np
    from PIL import Image

    from vla.models.clip import load_clip

    clip = load_clip("vla-micro-clip")
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 50, 3), dtype=np.uint8))
    torch.manual_seed(1)
    want = clip.train_preprocess()(image)
    torch.manual_seed(1)
    got = clip.uint8_train_preprocess()(image)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    clip.normalize_uint8_inputs()
    teacher = copy.deepcopy(clip.model.visual)  # contrast-tune's EMA teacher is such a copy
    seen = []
    for tower in (clip.model.visual, teacher):
        tower.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        tower(got[None])
        tower(want[None])
    for x in seen:
        assert torch.equal(x[0], want)
