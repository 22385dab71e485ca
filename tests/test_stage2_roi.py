"""stage2-roi on real-looking data through the CLI: a sample with no usable region (no region
caption, or only a box the centre crop removes) is skipped and counted under the skip limit, not
the end of the run; a resume finds the same samples; the image-captions switch adds L_gen_img."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.conftest import cli


FEW = ["--set", "eval.sets=[]", "--set", "train.batch_size=4", "--set", "data.shuffle_buffer=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 samples: 8 with a usable region, 2 without region captions (s01, s05), 2 whose only box
    lies in the 16 px the centre crop removes from a 64×32 image (s03, s06; vla-micro-clip reads
    32×32); then stage 1."""
    root = tmp_path_factory.mktemp("stage2-data")
    rng = torch.Generator().manual_seed(0)
    lines = []
    for i in range(12):
        wide = i in (3, 6)
        size = (64, 32) if wide else (32, 32)
        pixels = (torch.rand(size[1], size[0], 3, generator=rng) * 255).byte().numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
        regions = ([] if i in (1, 5) else
                   [{"box": [0, 2, 6, 20], "caption": "a thin strip on the far left"}] if wide else
                   [{"box": [2, 2, 20, 24], "caption": f"a red square number {i}"},
                    {"box": [4, 8, 30, 30], "caption": ""}])
        lines.append({"key": f"s{i:02d}", "image": f"{i}.png", "caption": f"a picture number {i}",
                      "regions": regions})
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cli("joint-train", "--data", root / "train.jsonl", "--out", root / "joint", "--recipe",
        "recipes/smoke/mmgem/joint-train.yaml", "--set", "train.steps=1", *FEW)
    return root


def test_samples_without_a_usable_region_are_skipped_and_counted(data, tmp_path) -> None:
    """The run finishes; the manifest counts the 4 unusable samples as no_usable_region, naming
    them, with the limit raised to let them through (4 of 12)."""
    cli("stage2-roi", "--data", data / "train.jsonl", "--init", data / "joint", "--out", tmp_path / "s2",
        "--recipe", "recipes/smoke/mmgem/stage2-roi.yaml", *FEW, "--set", "data.max_skip_fraction=0.5")
    m = json.loads((tmp_path / "s2" / "manifest.json").read_text())
    counts = m["counts"]["train"]
    assert counts["seen"] == 12 and counts["skipped"] == {"no_usable_region": 4}
    assert {e.split()[1] for e in counts["examples"]} == {"s01", "s03", "s05", "s06"}
    assert m["mmgem"]["image_captions"] is False


def test_too_many_unusable_samples_end_the_run_naming_the_limit(data, tmp_path) -> None:
    """Over data.max_skip_fraction the run stops (a stage error, exit 1) with one line naming the
    setting, the reason and the samples."""
    r = cli("stage2-roi", "--data", data / "train.jsonl", "--init", data / "joint", "--out", tmp_path / "s2",
            "--recipe", "recipes/smoke/mmgem/stage2-roi.yaml", *FEW, "--set", "data.max_skip_fraction=0.1", code=1)
    assert "data.max_skip_fraction" in r.output and "no_usable_region: 4" in r.output and "key s01" in r.output


class _Crash(Exception):
    pass


def test_a_resumed_stage2_counts_the_same_samples(data, tmp_path, monkeypatch) -> None:
    """Stopped after step 2 and rerun, the run's counts and model equal an uninterrupted run's:
    the resume's counting pass skips the unusable samples as the transform does."""
    from vla.models.mmgem import load_mmgem
    from vla.stages.stage2_roi import Stage2RoiRecipe, run

    args = dict(init=str(data / "joint"), soft_prompts=4)
    cfg = Stage2RoiRecipe(**args)
    cfg.train.steps, cfg.train.batch_size, cfg.train.checkpoint_every = 4, 4, 2
    cfg.data.max_skip_fraction, cfg.data.shuffle_buffer, cfg.eval.sets = 0.5, 0, []
    whole = run(cfg, data / "train.jsonl", tmp_path / "whole")
    import vla.train as train_module

    original = train_module.train

    def crash_after_step_two(*a, **k):
        original(*a, **{**k, "stop_at_step": 2})
        raise _Crash

    monkeypatch.setattr(train_module, "train", crash_after_step_two)
    with pytest.raises(_Crash):
        run(cfg, data / "train.jsonl", tmp_path / "resumed")
    monkeypatch.setattr(train_module, "train", original)
    resumed = run(cfg, data / "train.jsonl", tmp_path / "resumed")
    assert resumed.manifest["counts"]["train"]["skipped"] == {"no_usable_region": 4}
    assert resumed.manifest["counts"]["train"] == whole.manifest["counts"]["train"]
    a, b = load_mmgem(whole.path / "model"), load_mmgem(resumed.path / "model")
    assert torch.equal(a.h4.weight, b.h4.weight) and torch.equal(a.h3.weight, b.h3.weight)


def test_the_image_captions_switch_adds_the_image_caption_loss(data, tmp_path) -> None:
    """image_captions: true trains h3 on the images' own captions too (gen_img in the metrics);
    with objective embed (h4 only) it is refused."""
    cli("stage2-roi", "--data", data / "train.jsonl", "--init", data / "joint", "--out", tmp_path / "s2",
        "--recipe", "recipes/smoke/mmgem/stage2-roi.yaml", *FEW, "--set", "data.max_skip_fraction=0.5",
        "--set", "image_captions=true")
    m = json.loads((tmp_path / "s2" / "manifest.json").read_text())
    assert m["mmgem"]["image_captions"] is True and m["metrics"]["train"]["gen_img"] > 0
    r = cli("stage2-roi", "--data", data / "train.jsonl", "--init", data / "joint", "--out", tmp_path / "s3",
            "--recipe", "recipes/smoke/mmgem/stage2-roi.yaml", "--set", "image_captions=true", "--set", "objective=embed",
            code=2)
    assert "image_captions" in r.output


def test_stage2_with_grad_checkpointing_trains_the_same_heads(data, tmp_path) -> None:
    """train.grad_checkpointing in stage 2 (the frozen LM checkpointed, in training mode since it
    has no dropout) gives the heads of a run without it."""
    from vla.models.mmgem import load_mmgem

    args = ["--data", data / "train.jsonl", "--init", data / "joint", "--recipe", "recipes/smoke/mmgem/stage2-roi.yaml",
            *FEW, "--set", "data.max_skip_fraction=0.5", "--set", "train.steps=2"]
    cli("stage2-roi", "--out", tmp_path / "plain", *args)
    cli("stage2-roi", "--out", tmp_path / "ckpt", *args, "--set", "train.grad_checkpointing=true")
    a, b = load_mmgem(tmp_path / "plain" / "model"), load_mmgem(tmp_path / "ckpt" / "model")
    for name in ("h3.weight", "h4.weight"):
        assert torch.allclose(a.state_dict()[name], b.state_dict()[name], atol=1e-6), name
    table_a, table_b = a.lm.get_input_embeddings().weight, b.lm.get_input_embeddings().weight
    assert torch.allclose(table_a, table_b, atol=1e-6)  # the soft prompts' rows included
