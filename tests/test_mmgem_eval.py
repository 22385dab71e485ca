"""`vla eval` of MM-GEM: regions from the full image + box (a CLIP still gets crops), captions of
images and regions through `generate`, where MM-GEM's text side truncates, the caption cap, and
one table with a plain CLIP, stage 1 and stage 2 through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from vla.cli import app
from vla.evaluate.evalsets import load_eval_set
from vla.evaluate.run import (CaptionConfig, Captioner, RegionEncoder, caption_subset, evaluate_model,
                              image_captions, region_captions, region_embeddings, truncation)
from tests.conftest import cli

runner = CliRunner()
# n_test=24: the long-text property (>= 50% of long captions share their visible prefix) is a
# statistic over the test images, which 12 images of this world do not reach
WORLD = ["--recipe", "recipes/smoke/synth.yaml", "--set", "n_train=32", "--set", "n_val=8", "--set", "n_test=24",
         "--set", "shard_size=16"]
FEW_STEPS = ["--set", "train.steps=2", "--set", "train.checkpoint_every=2", "--set", "eval.sets=[]"]
CLIP = "vla-micro-clip"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny world → joint-train → stage2-roi (two steps each: the heads move, that is all we need)."""
    root = tmp_path_factory.mktemp("mmgem-eval")
    cli("synth", "--out", root / "world", *WORLD)
    cli("joint-train", "--data", root / "world", "--out", root / "joint", "--recipe",
        "recipes/smoke/mmgem/joint-train.yaml", *FEW_STEPS)
    cli("stage2-roi", "--data", root / "world", "--init", root / "joint", "--out", root / "stage2", "--recipe",
        "recipes/smoke/mmgem/stage2-roi.yaml", *FEW_STEPS)
    return root


@pytest.fixture(scope="module")
def models(chain):
    from vla.models.load import load_encoder

    return {name: load_encoder(str(chain / name)) for name in ("joint", "stage2")} | {"clip": load_encoder(CLIP)}


@pytest.fixture(scope="module")
def regional(chain):
    return load_eval_set(chain / "world" / "eval" / "regional")


def _full_image_and_box(model, es, i):
    """Region i as MM-GEM should read it: its source image uncropped, its box in the image's pixels."""
    src = es.region_sources([i])[0]
    return [src.load()], [src.boxes]


# --- 1. regional retrieval: full image + box for MM-GEM, crops for a CLIP ---------------------------


def test_mmgem_regions_are_embedded_from_the_full_image_and_box_not_the_crop(models, regional) -> None:
    for name in ("joint", "stage2"):
        model = models[name]
        assert isinstance(model, RegionEncoder)
        used = region_embeddings(model, regional, batch_size=4)  # batches cut across images
        assert used.shape[0] == len(regional.images) > len(regional.region_sources())
        one_by_one = torch.cat([model.encode_regions(*_full_image_and_box(model, regional, i))
                                for i in range(len(regional.images))])
        assert torch.allclose(used, one_by_one, atol=1e-5)
        crops = model.encode_image(list(regional.images))  # what a crop-based path would give
        assert not torch.allclose(used, crops, atol=1e-3)
        # the source image really is the whole image: a box's crop is smaller than it
        src = regional.region_sources([0])[0]
        assert src.load().size != regional.images[0].size
    # stage 2 reads regions through its trained h4, stage 1 through the identity
    assert not torch.allclose(region_embeddings(models["joint"], regional, 64),
                              region_embeddings(models["stage2"], regional, 64), atol=1e-4)


def test_a_clip_in_the_same_eval_still_gets_the_crops(models, regional) -> None:
    clip = models["clip"]
    assert not isinstance(clip, RegionEncoder) and not isinstance(clip, Captioner)
    assert torch.equal(region_embeddings(clip, regional, 64),
                       F.normalize(clip.encode_image(list(regional.images)).float(), dim=-1))


def test_boxes_map_into_the_towers_input_and_a_bad_box_is_refused_with_its_key(models, regional) -> None:
    from vla.errors import UserError

    model = models["stage2"]
    src = regional.region_sources([0])[0]
    image = src.load()
    # the world's square images are stored at 4x the tower's size: the mapping is a plain scale,
    # the whole image onto the whole input
    side = model.input_boxes([image], [[[0, 0, image.width, image.height]]])[0]
    tower = float(side[0, 2])
    assert side.tolist() == [[0, 0, tower, tower]] and tower < image.width
    expected = torch.tensor(src.boxes) * tower / image.width
    assert torch.allclose(model.input_boxes([image], [src.boxes])[0], expected, atol=1e-4)
    big = image.resize((image.width * 2, image.height * 2))
    doubled = [[2 * v for v in box] for box in src.boxes]
    assert torch.allclose(model.input_boxes([big], [doubled])[0], expected, atol=1e-4)
    with pytest.raises(UserError, match="sample-7: region box .* lies outside"):
        model.input_boxes([image], [[[0, 0, image.width + 5, 4]]], keys=["sample-7"])


# --- 2. captioning of images and regions ---------------------------------------------------------


def test_image_and_region_captions_are_generated_from_the_image_and_from_the_full_image_plus_box(models, chain,
                                                                                          regional) -> None:
    captioning = load_eval_set(chain / "world" / "eval" / "captioning")
    cfg = CaptionConfig(num_beams=2, max_new_tokens=6, batch_size=3, max_images=4, max_regions=5)
    stage2 = models["stage2"]
    chosen, captions = image_captions(stage2, captioning, cfg)
    assert chosen == caption_subset(len(captioning.images), 4) and len(captions) == 4
    assert captions == stage2.caption([captioning.images[i] for i in chosen], num_beams=2, max_new_tokens=6)
    chosen, captions = region_captions(stage2, regional, cfg)
    assert len(chosen) == len(captions) == 5
    without_soft = []
    for i, caption in zip(chosen, captions):  # each region from its full image, box and soft prompts
        images, boxes = _full_image_and_box(stage2, regional, i)
        assert [caption] == stage2.caption(images, boxes, num_beams=2, max_new_tokens=6)
        without_soft += stage2.caption(images, boxes, num_beams=2, max_new_tokens=6, soft=False)
    # the soft prompts change what is written (an untrained tiny LM may still write the same
    # 6 tokens for some regions either way)
    assert without_soft != captions


def test_caption_subset_is_evenly_spread_and_the_same_for_every_call() -> None:
    assert caption_subset(10, None) == caption_subset(10, 10) == caption_subset(10, 99) == list(range(10))
    assert caption_subset(10, 4) == [0, 2, 5, 7] == caption_subset(10, 4)
    assert caption_subset(2548, 500)[-1] < 2548 and len(set(caption_subset(2548, 500))) == 500


def test_a_model_that_does_not_generate_gets_no_captioning_results(models, chain, regional) -> None:
    captioning = load_eval_set(chain / "world" / "eval" / "captioning")
    results = evaluate_model(models["clip"], [regional, captioning], batch_size=64)
    assert set(results) == {"regional"}


# --- 3. where MM-GEM's text side truncates ---------------------------------------------------------


def test_truncation_is_reported_exactly_where_the_lm_cuts_a_text(models) -> None:
    model = models["joint"]
    cap = model.config.max_text_tokens  # 24 in the smoke recipe
    word = "a"  # one token, and so is " a": k words are k tokens
    assert len(model.tokenize([word])[0][0]) == 1
    at_limit, over = " ".join([word] * cap), " ".join([word] * (cap + 1))
    assert [len(r) for r in model.tokenize([at_limit, over])[0]] == [cap, cap]
    assert model.tokenize([at_limit])[1] == 0 and model.tokenize([over])[1] == 1
    # what the report says agrees with what the LM read: one text of the two was cut
    assert truncation(model, [at_limit, over]) == {"text_truncated_fraction": 0.5,
                                                   "context_length": model.text_context_length}
    assert truncation(model, [at_limit]) == {"text_truncated_fraction": 0.0,
                                             "context_length": model.text_context_length}
    assert model.text_context_length == model.text_token_counts([at_limit])[0]  # [EMB] (and BOS) counted


# --- 6. the CLI: a CLIP, stage 1 and stage 2 in one table ---------------------------------------


def test_vla_eval_scores_a_clip_and_both_mmgem_stages_on_every_task(chain, models, regional) -> None:
    out = chain / "eval"
    r = cli("eval", CLIP, chain / "joint", chain / "stage2", "--data", chain / "world", "--out", out,
            "--recipe", "recipes/smoke/mmgem/eval-mmgem.yaml", "--set", "caption.max_regions=7")
    results = json.loads((out / "results.json").read_text())
    rows = {name: next(v for k, v in results.items() if k.endswith(f"({name})") or k == name)
            for name in ("joint", "stage2", CLIP)}
    mmgem_sets = {"retrieval", "long_retrieval", "zeroshot", "regional", "regional_captioning", "captioning"}
    assert set(rows["joint"]) == set(rows["stage2"]) == mmgem_sets
    assert set(rows[CLIP]) == {"retrieval", "long_retrieval", "zeroshot", "regional"}
    for name in ("joint", "stage2"):
        for entry in ("captioning", "regional_captioning"):
            assert {"bleu4", "cider_d", "n_captioned"} <= set(rows[name][entry])
        assert rows[name]["regional_captioning"]["n_captioned"] == 7
        # the recipe's cap (max_images: 16) on the world's 24 test images
        assert rows[name]["captioning"]["n_images"] == 24 and rows[name]["captioning"]["n_captioned"] == 16
    # stage 2: global retrieval is stage 1's exactly; regions come from its own heads
    for entry in ("retrieval", "long_retrieval", "zeroshot"):
        assert rows["stage2"][entry] == rows["joint"][entry], entry
    from vla.evaluate.retrieval import retrieval_metrics

    texts, owner = regional.texts()
    for name in ("joint", "stage2"):
        expected = retrieval_metrics(region_embeddings(models[name], regional, 64),
                                     F.normalize(models[name].encode_text(texts), dim=-1), owner)
        assert {k: rows[name]["regional"][k] for k in expected} == pytest.approx(expected)
    captions = {name: [json.loads(line) for line in
                       next((out / "captions").glob(f"*{name}*")).joinpath("regional_captioning.jsonl").open()]
                for name in ("joint", "stage2")}
    assert [c["key"] for c in captions["joint"]] == [c["key"] for c in captions["stage2"]]  # the same regions
    assert [c["caption"] for c in captions["joint"]] != [c["caption"] for c in captions["stage2"]]
    assert all(len(c["box"]) == 4 and c["references"] for c in captions["stage2"])
    # the report says how regions were read, who does not caption, and the cap
    md = (out / "results.md").read_text()
    assert "each region from the full image and its box (RoIAlign); vla-micro-clip: each region's crop" in md
    assert "vla-micro-clip does not generate text, so it has no captioning results" in md
    assert f"regional_captioning: 7 of {len(regional.images)} regions captioned" in md
    assert "regional_captioning CIDEr-D" in md and "captioning BLEU-4" in md
    # CLIP_benchmark's layout: region captioning is the regional dataset's captioning task
    bench = [json.loads(p.read_text()) for p in (out / "clip_benchmark").glob("*.json")]
    region_caps = [b for b in bench if b["entry"] == "regional_captioning"]
    assert len(region_caps) == 2 and all(b["dataset"] == "wds/regional" and b["task"] == "captioning"
                                         for b in region_caps)
    assert not any(b["task"] == "captioning" and CLIP in b["model"] for b in bench)
    # eval-merge of those files gives back the same entries
    cli("eval-merge", out / "clip_benchmark", "--out", chain / "merged")
    merged = json.loads((chain / "merged" / "results.json").read_text())
    assert {m: set(v) for m, v in merged.items()} == {m: set(v) for m, v in results.items()}
    assert "train step" not in r.output


def test_rows_are_labelled_by_mmgem_stage_and_objective(tmp_path) -> None:
    from vla.stages.evaluate import model_label

    for kind, objective, label in [("joint-train", "joint", "MM-GEM stage 1"),
                                   ("joint-train", "embed", "MM-GEM embed-only"),
                                   ("joint-train", "caption", "MM-GEM caption-only"),
                                   ("stage2-roi", "joint", "MM-GEM stage 2")]:
        art = tmp_path / f"{kind}-{objective}"
        art.mkdir()
        (art / "manifest.json").write_text(json.dumps({"kind": kind, "recipe": {"objective": objective}}))
        assert model_label(str(art), "mmgem") == f"{label} ({art.name})"


def test_a_bad_caption_setting_is_one_line_naming_the_key(chain, tmp_path) -> None:
    r = runner.invoke(app, ["eval", CLIP, "--data", str(chain / "world"), "--out", str(tmp_path / "e"),
                            "--recipe", "recipes/smoke/mmgem/eval-mmgem.yaml", "--set", "caption.num_beams=0"])
    assert r.exit_code == 2 and "caption.: num_beams must be at least 1, not 0" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "e").exists()


# --- choices on the val split, and the training side of claim (a) in the eval artifact -------------


def _shard_keys_and_captions(split_dir) -> tuple[set[str], set[str]]:
    from vla.data.shards import iter_samples
    from vla.data.skips import SkipCounter

    samples = list(iter_samples(sorted(split_dir.glob("*.tar")), SkipCounter(), decode=False))
    return {s.key for s in samples}, {c for s in samples for c in s.captions}


def test_eval_with_split_val_scores_the_worlds_val_images_not_the_test_sets(chain, tmp_path) -> None:
    """`vla eval --set split=val` builds the same sets from the world's val split (8 images here,
    the test sets have 24): every captioned image is a val sample with its val captions as
    references, and the manifest names the split."""
    out = tmp_path / "eval-val"
    cli("eval", chain / "joint", "--data", chain / "world", "--out", out, "--recipe",
        "recipes/smoke/mmgem/eval-mmgem.yaml", "--set", "sets=[retrieval,long_retrieval,regional,captioning]",
        "--set", "split=val")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split"] == "val"
    results = json.loads((out / "results.json").read_text())
    row = next(iter(results.values()))
    assert row["long_retrieval"]["n_images"] == row["captioning"]["n_images"] == 8
    val_keys, val_captions = _shard_keys_and_captions(chain / "world" / "val")
    test_keys, _ = _shard_keys_and_captions(chain / "world" / "test")
    written = [json.loads(line) for line in next((out / "captions").glob("*/captioning.jsonl")).read_text().splitlines()]
    assert written and {r["key"] for r in written} <= val_keys and not {r["key"] for r in written} & test_keys
    assert all(set(r["references"]) <= val_captions for r in written)


def test_split_val_needs_a_synth_artifact_and_says_so_in_one_line(chain, tmp_path) -> None:
    """A directory of eval sets has one split: `split: val` on it is refused in one line, exit 2."""
    r = runner.invoke(app, ["eval", CLIP, "--data", str(chain / "world" / "eval"), "--out", str(tmp_path / "e"),
                            "--set", "split=val"])
    assert r.exit_code == 2 and "split: val needs a synth artifact" in r.output
    assert "Traceback" not in r.output


def test_eval_of_joint_train_artifacts_plots_their_loss_curves_from_the_manifests(chain, tmp_path) -> None:
    """With joint-train artifacts among the models, the eval artifact holds loss_curves.png and a
    training section in results.md: the L_gen panel has one curve per model that logged L_gen
    (joint and caption-only, not the stage-2 model), each equal to its manifest's curve."""
    from vla.evaluate.report import loss_curve_figure
    from vla.stages.evaluate import training_records

    cli("joint-train", "--data", chain / "world", "--out", tmp_path / "caption-only", "--recipe",
        "recipes/smoke/mmgem/joint-train-caption.yaml", *FEW_STEPS)
    refs = {"joint": str(chain / "joint"), "caption-only": str(tmp_path / "caption-only"),
            "stage2": str(chain / "stage2")}
    records = training_records(refs)
    assert list(records) == ["joint", "caption-only"]
    fig = loss_curve_figure({n: r["loss_curves"] for n, r in records.items()})
    gen_ax, emb_ax = fig.axes[:2]
    assert gen_ax.get_title().startswith("L_gen") and emb_ax.get_title().startswith("L_emb")
    for ax, term, names in ((gen_ax, "gen", ["joint", "caption-only"]), (emb_ax, "emb", ["joint"])):
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == names
        for ln, name in zip(lines, names):
            manifest = json.loads((tmp_path / name if name == "caption-only" else chain / name)
                                  .joinpath("manifest.json").read_text())["mmgem"]["loss_curves"]
            assert list(ln.get_xdata()) == manifest["step"] and list(ln.get_ydata()) == manifest[term]

    out = tmp_path / "eval"
    cli("eval", chain / "joint", tmp_path / "caption-only", chain / "stage2", "--data", chain / "world",
        "--out", out, "--set", "sets=[retrieval]")
    assert (out / "loss_curves.png").stat().st_size > 0
    text = (out / "results.md").read_text()
    assert "## Training (joint-train manifests)" in text and "(loss_curves.png)" in text
    training = text.split("## Training (joint-train manifests)")[1]
    assert "MM-GEM stage 1 (joint)" in training and "MM-GEM caption-only (caption-only)" in training
    assert "MM-GEM stage 2" not in training


def test_an_eval_of_no_joint_train_artifact_writes_no_loss_curves(chain, tmp_path) -> None:
    """A CLIP and a stage-2 model have no stage-1 loss curves: no figure, no training section."""
    out = tmp_path / "eval"
    cli("eval", CLIP, chain / "stage2", "--data", chain / "world", "--out", out, "--set", "sets=[retrieval]")
    assert not (out / "loss_curves.png").exists()
    assert "## Training" not in (out / "results.md").read_text()


def test_split_eval_sets_of_the_test_split_reproduce_the_worlds_own_eval_sets(chain, tmp_path) -> None:
    """The val sets are built by synth's own rules: applied to the test split, `split_eval_sets`
    gives the world's eval/ sets (same images, captions and regions, task by task)."""
    from vla.data.synth import split_eval_sets

    out = tmp_path / "sets"
    out.mkdir()
    counts = split_eval_sets(chain / "world", "test", out)
    for task in ("retrieval", "long_retrieval", "regional", "captioning", "zeroshot"):
        ours, theirs = load_eval_set(out / task), load_eval_set(chain / "world" / "eval" / task)
        assert len(ours.images) == len(theirs.images) > 0, task
        info = json.loads((chain / "world" / "eval" / task / "info.json").read_text())
        assert counts[task] == {k: v for k, v in info.items() if k != "task"}, task
        assert ours.captions == theirs.captions and ours.labels == theirs.labels, task
        assert [list(a.tobytes()) == list(b.tobytes()) for a, b in zip(ours.images[:3], theirs.images[:3])] == [True] * 3
