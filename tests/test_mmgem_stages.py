"""MM-GEM's two stages through the CLI: `vla joint-train` → `vla stage2-roi` chained by manifest,
what stage 2 leaves frozen (bit for bit), the objective switch, resume after SIGKILL, and refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from vla.cli import app
from tests.test_cli import vla
from tests.conftest import cli

runner = CliRunner()
WORLD = ["--recipe", "recipes/smoke/synth.yaml", "--set", "n_train=48", "--set", "n_val=8", "--set", "n_test=24",
         "--set", "shard_size=24"]
JOINT = ["--recipe", "recipes/smoke/mmgem/joint-train.yaml"]
STAGE2 = ["--recipe", "recipes/smoke/mmgem/stage2-roi.yaml"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """world → joint-train → stage2-roi, each stage reading the previous one's artifact."""
    root = tmp_path_factory.mktemp("mmgem")
    cli("synth", "--out", root / "world", *WORLD)
    cli("joint-train", "--data", root / "world", "--out", root / "joint", *JOINT)
    cli("stage2-roi", "--data", root / "world", "--init", root / "joint", "--out", root / "stage2", *STAGE2)
    return root


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_the_smoke_curriculum_chains_by_manifest(chain) -> None:
    joint, stage2 = _manifest(chain / "joint"), _manifest(chain / "stage2")
    assert joint["kind"] == "joint-train" and stage2["kind"] == "stage2-roi"
    assert stage2["inputs"]["init"]["digest"] == joint["digest"]
    assert stage2["inputs"]["init"]["inputs"]["data"]["kind"] == "synth"
    # stage 1: both terms every step, whole-run caption counts, the optimizer and the LM call said
    assert {"emb", "gen"} <= set(joint["metrics"]["train"])
    assert joint["counts"]["captions"]["captions"] == joint["counts"]["train"]["samples"] == 6 * 16
    assert joint["mmgem"]["optimizer"]["name"] == "lamb" and joint["mmgem"]["optimizer"]["deviation_from_paper"] is None
    forward = joint["mmgem"]["lm_forward"]
    assert {k: forward[k] for k in ("calls_per_step", "hidden_states_shared", "rows")} == {
        "calls_per_step": 1, "hidden_states_shared": False, "rows": "[EMB] rows + caption rows"}
    assert forward["statement"].startswith("One LM forward per step is shared between [EMB] and [CAP]")
    assert joint["mmgem"]["step_samples_per_s"] == joint["timings"]["samples_per_s"] > 0
    assert "retrieval" in joint["metrics"]["eval"]
    assert (chain / "joint" / "model" / "lm" / "model.safetensors").is_file()  # transformers' layout
    # stage 2: only h3, h4 and the soft prompts train
    assert stage2["mmgem"]["trained"] == ["h3.bias", "h3.weight", "h4.bias", "h4.weight", "soft_prompts"]
    assert stage2["mmgem"]["tokens"]["[CAP_4]"] == stage2["mmgem"]["tokens"]["[CAP]"] + 4


def _weights(path) -> tuple[dict, dict]:
    return load_file(path / "model" / "mmgem.safetensors"), load_file(path / "model" / "lm" / "model.safetensors")


def test_stage2_leaves_every_frozen_weight_bit_identical(chain) -> None:
    heads1, lm1 = _weights(chain / "joint")
    heads2, lm2 = _weights(chain / "stage2")
    assert heads1.keys() == heads2.keys() and lm1.keys() == lm2.keys()
    trained = {k for k in heads1 if k.startswith(("h3.", "h4."))}
    assert trained == {"h3.weight", "h3.bias", "h4.weight", "h4.bias"}
    for k in heads1.keys() - trained:  # the ViT, h1, h2, the temperature
        assert torch.equal(heads1[k], heads2[k]), k
    for k in trained:
        assert not torch.equal(heads1[k], heads2[k]), f"{k} did not train"
    assert torch.equal(heads1["h4.weight"], torch.eye(heads1["h4.weight"].shape[0]))  # identity in stage 1
    n_soft = 4
    for k in lm1:  # the LM: every tensor, and every stage-1 row of the grown tables, unchanged
        rows = lm1[k].shape[0]
        if lm2[k].shape != lm1[k].shape:
            assert lm2[k].shape[0] == rows + n_soft and k.endswith(("embed_tokens.weight", "lm_head.weight")), k
        assert torch.equal(lm1[k], lm2[k][:rows]), k
    table = next(k for k in lm2 if k.endswith("embed_tokens.weight"))
    assert not torch.equal(lm2[table][-n_soft:], torch.zeros_like(lm2[table][-n_soft:]))


def test_stage2_global_retrieval_is_stage1s_exactly(chain) -> None:
    from vla.models.load import load_encoder

    stage1, stage2 = load_encoder(str(chain / "joint")), load_encoder(str(chain / "stage2"))
    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=rng) * 255).byte().numpy()) for _ in range(3)]
    texts = ["a large red circle in the top left", "two shapes on a blue background"]
    assert torch.equal(stage1.encode_image(images), stage2.encode_image(images))
    assert torch.equal(stage1.encode_text(texts), stage2.encode_text(texts))
    # while regions now go through the trained h4
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]])] * 3
    assert not torch.equal(stage1.encode_regions(images, boxes), stage2.encode_regions(images, boxes))
    # and `vla eval` scores both artifacts, with the same global retrieval
    r = cli("eval", chain / "joint", chain / "stage2", "--data", chain / "world", "--sets", "retrieval",
            "--out", chain / "eval")
    results = _manifest(chain / "eval")["metrics"]
    # rows are labelled by kind and directory, e.g. "joint-train (joint)"
    row = {name: next(v for k, v in results.items() if k == name or k.endswith(f"({name})")) for name in ("joint", "stage2")}
    assert row["joint"]["retrieval"] == row["stage2"]["retrieval"], r.output


@pytest.mark.parametrize("objective, term", [("embed", "emb"), ("caption", "gen")])
def test_the_objective_switch_trains_one_term(chain, tmp_path, objective, term) -> None:
    out = tmp_path / objective
    cli("joint-train", "--data", chain / "world", "--out", out, *JOINT, "--objective", objective,
        "--set", "train.steps=2", "--set", "eval.sets=[]")
    m = _manifest(out)
    assert m["recipe"]["objective"] == objective and m["mmgem"]["lm_forward"]["rows"] != "[EMB] rows + caption rows"
    assert term in m["metrics"]["train"] and ({"emb", "gen"} - {term}).isdisjoint(m["metrics"]["train"])
    # the head only the other term would train is left as built
    built, _ = _weights(chain / "joint")  # same seed: the same initial heads, trained there
    heads, _ = _weights(out)
    idle = "h3.weight" if objective == "embed" else "h2.weight"
    fresh = _fresh_heads()
    assert torch.equal(heads[idle], fresh[idle]) and not torch.equal(built[idle], fresh[idle])


def _fresh_heads() -> dict:
    """The smoke recipe's model as built, before any step (the seed fixes it)."""
    from vla.recipes import load_recipe
    from vla.stages.joint_train import JointTrainRecipe

    cfg = load_recipe(JointTrainRecipe, "recipes/smoke/mmgem/joint-train.yaml", kind="joint-train")
    from vla.models.mmgem import build_mmgem

    torch.manual_seed(cfg.train.seed)
    model = build_mmgem(cfg.vision, None, ["a red circle", "a blue square"], cfg.model, seed=cfg.train.seed,
                        lm_size=cfg.tiny_lm)
    return {k: v for k, v in model.state_dict().items() if k.startswith(("h2.", "h3."))}


def test_wrong_kinds_are_refused_before_any_compute(chain, tmp_path) -> None:
    for args, expected in [
        (("stage2-roi", "--data", chain / "world", "--init", chain / "world", "--out", tmp_path / "a", *STAGE2),
         "is a 'synth' artifact; --init expects 'joint-train'"),
        (("stage2-roi", "--data", chain / "world", "--init", chain / "stage2", "--out", tmp_path / "b", *STAGE2),
         "is a 'stage2-roi' artifact; --init expects 'joint-train'"),
        (("joint-train", "--data", chain / "world", "--vision", chain / "joint", "--out", tmp_path / "c", *JOINT),
         "--vision expects 'pretrain' or 'contrast-tune'"),
    ]:
        started = time.perf_counter()
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 2 and expected in r.output.replace("\n", ""), r.output
        assert time.perf_counter() - started < 10
        assert not any(tmp_path.iterdir())  # nothing written


def test_a_bad_out_is_refused_before_any_model_loads(chain, tmp_path) -> None:
    # --vision and --init name nothing that exists: had a stage loaded a model first, the error
    # would be about them; claim_out must refuse the --out first, in one line
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("the user's own file")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, expected in [
        (("joint-train", "--data", chain / "world", "--vision", "no-such-tower", "--out", taken, *JOINT),
         "exists and is not a vla artifact"),
        (("joint-train", "--data", chain / "world", "--vision", "no-such-tower", "--out", a_file, *JOINT),
         "is an existing file"),
        (("joint-train", "--data", chain / "world", "--out", chain / "world" / "joint", *JOINT),
         "lies inside the data input"),
        (("stage2-roi", "--data", chain / "world", "--init", tmp_path / "no-such-joint", "--out", taken, *STAGE2),
         "exists and is not a vla artifact"),
        (("stage2-roi", "--data", chain / "world", "--init", chain / "joint", "--out", chain / "joint", *STAGE2),
         "is the init input"),
        (("stage2-roi", "--data", chain / "world", "--init", tmp_path / "no-such-joint", "--out", chain / "stage2",
          *STAGE2), "is already a finished 'stage2-roi' artifact; pass --force"),
    ]:
        started = time.perf_counter()
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 2 and expected in r.output.replace("\n", ""), r.output
        assert "Traceback" not in r.output and time.perf_counter() - started < 10
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and a_file.read_text() == "x"
    assert not (chain / "world" / "joint").exists()


def test_data_whose_regions_are_all_cropped_away_stops_naming_the_reason(chain, tmp_path) -> None:
    """A region the centre crop removes is not usable; samples without a usable region are skipped
    (tests/test_stage2_roi.py), and data with none at all stops, naming why."""
    from vla.data.sample import Region, Sample
    from vla.data.shards import ShardWriter

    # a 96×32 image: the micro tower's 32-px centre crop keeps x in [32, 64); the box is left of it
    image = Image.new("RGB", (96, 32), (200, 30, 30))
    with ShardWriter(tmp_path / "shards") as w:
        for i in range(4):
            w.write(Sample(key=f"wide{i}", image=image, captions=["a red picture"],
                           regions=[Region(box=(2.0, 2.0, 20.0, 20.0), label="square", caption="a red square")]))
    r = runner.invoke(app, ["stage2-roi", "--data", str(tmp_path / "shards"), "--init", str(chain / "joint"),
                            "--out", str(tmp_path / "out"), *STAGE2, "--set", "train.batch_size=2"])
    assert r.exit_code == 1, r.output
    assert "no usable sample" in r.output and "skipped no_usable_region" in r.output
    assert not (tmp_path / "out").exists()


def test_a_killed_joint_train_resumes_to_identical_weights(chain, tmp_path) -> None:
    args = ["--data", chain / "world", *JOINT, "--set", "train.steps=10", "--set", "train.batch_size=8",
            "--set", "train.checkpoint_every=2", "--set", "eval.sets=[]"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = vla("joint-train", "--out", whole, *args)
    assert r.returncode == 0, r.stderr

    ckpt = tmp_path / ".killed.partial" / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "vla", "joint-train", "--out", str(killed), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "VLA_NO_PROGRESS": "1"})
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"

    r = vla("joint-train", "--out", killed, *args)
    assert r.returncode == 0, r.stderr
    m = _manifest(killed)
    assert m["resumed"] is True
    assert m["counts"]["captions"] == _manifest(whole)["counts"]["captions"]  # whole-run totals
    for a, b in zip(_weights(whole), _weights(killed)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


# --- the pieces the stages are made of, without the CLI ----------------------------------------------

CAPTIONS = ["a small red circle in the top left", "a large blue square", "two green triangles", "a star"]


def _micro_model(**config):
    from vla.models.mmgem import MMGEMConfig, build_mmgem

    return build_mmgem("vla-micro-clip", None, CAPTIONS, MMGEMConfig(max_text_tokens=12, **config))


@pytest.mark.parametrize("objective", ["joint", "embed", "caption"])
def test_every_trained_parameter_gets_a_gradient(objective) -> None:
    # DDP refuses a trained parameter without a gradient; an ablation must freeze the idle heads
    from vla.losses import ClipLoss
    from vla.models.mmgem.objective import MMGEMTrainer
    from vla.stages.joint_train import parameter_groups

    model = _micro_model()
    groups = parameter_groups(model, objective)
    trainer = MMGEMTrainer(model, objective, ClipLoss())
    out = trainer(torch.randn(4, 3, 32, 32), CAPTIONS)
    out["loss"].backward()
    trained = [p for ps in groups.values() for p in ps]
    assert {id(p) for p in trained} == {id(p) for p in model.parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in trained if p.grad is None] == []
    assert all(len(ps) for ps in groups.values())
    assert trainer.counted() == {"captions": 4, "truncated": 0}


def test_lamb_is_timms_and_an_unknown_optimizer_is_refused() -> None:
    from timm.optim import Lamb

    from vla.errors import UserError
    from vla.optim import build_optimizer
    from vla.train import TrainConfig

    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = build_optimizer([{"params": [p], "lr_scale": 0.1}], lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                          weight_decay=0.05, name="lamb")
    assert isinstance(opt, Lamb) and opt.param_groups[0]["lr_scale"] == 0.1
    with pytest.raises(UserError, match="train.optimizer"):
        TrainConfig(optimizer="sgd")


def test_mode_tokens_are_never_written_in_a_caption() -> None:
    from vla.models.mmgem import greedy_decode_without_cache

    model = _micro_model(soft_prompts=2).eval()
    px = torch.randn(2, 3, 32, 32)
    head = model.lm.get_output_embeddings().weight
    with torch.no_grad():  # point the mode tokens' output rows along the first step's hidden states
        states = model.lm.get_decoder()(inputs_embeds=model.caption_inputs(px)).last_hidden_state[:, -1]
        head[model.mode_token_ids] = 100 * states.mean(0)
        first = model.lm(inputs_embeds=model.caption_inputs(px)).logits[:, -1].argmax(-1)
    assert set(first.tolist()) <= set(model.mode_token_ids)  # unmasked, they would be written first
    ids = model.generate_ids(px, max_new_tokens=5)
    with torch.no_grad():
        naive = greedy_decode_without_cache(model, model.caption_inputs(px), max_new_tokens=5)
    assert ids == naive and not set(model.mode_token_ids) & {t for row in ids for t in row}


def test_adding_soft_prompts_keeps_stage1_rows_and_refuses_another_number() -> None:
    from vla.errors import UserError

    model = _micro_model().eval()
    table = model.lm.get_input_embeddings().weight.detach().clone()
    text = model.encode_text(CAPTIONS)
    model.add_soft_prompts(3)
    grown = model.lm.get_input_embeddings().weight
    assert grown.shape[0] == table.shape[0] + 3 and torch.equal(grown[: table.shape[0]], table)
    assert torch.equal(model.encode_text(CAPTIONS), text)
    model.add_soft_prompts(3)  # the same number: nothing to do
    with pytest.raises(UserError, match="already has 3 soft prompts"):
        model.add_soft_prompts(5)


def test_joint_train_starts_from_a_pretrain_artifacts_tower(chain, tmp_path) -> None:
    cli("pretrain", "--data", chain / "world", "--out", tmp_path / "clip", "--recipe", "recipes/smoke/pretrain.yaml",
        "--set", "train.steps=1", "--set", "eval.sets=[]")
    cli("joint-train", "--data", chain / "world", "--vision", tmp_path / "clip", "--out", tmp_path / "joint", *JOINT,
        "--set", "train.steps=1", "--set", "eval.sets=[]")
    m = _manifest(tmp_path / "joint")
    assert m["inputs"]["vision"]["kind"] == "pretrain"
    assert m["inputs"]["vision"]["digest"] == _manifest(tmp_path / "clip")["digest"]


def test_joint_train_under_torchrun_counts_every_ranks_captions(chain, tmp_path) -> None:
    # two gloo ranks: DDP finds a gradient for every trained parameter, InfoNCE gathers with grad,
    # and the checkpointed caption counts are the global ones on every rank
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "vla", "joint-train",
                        "--data", str(chain / "world"), "--out", str(tmp_path / "ddp"), *JOINT,
                        "--set", "train.steps=2", "--set", "eval.sets=[]", "--set", "train.device=cpu"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "VLA_NO_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    m = _manifest(tmp_path / "ddp")
    assert m["counts"]["captions"]["captions"] == m["counts"]["train"]["samples"] == 2 * 16 * 2


# --- vla export / vla.load of an MM-GEM artifact -------------------------------------------------------


def _images(n: int) -> list:
    rng = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=rng) * 255).byte().numpy()) for _ in range(n)]


def test_an_export_reloads_with_identical_embeddings_and_greedy_captions(chain, tmp_path) -> None:
    import vla
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vla.models.mmgem import load_mmgem

    r = cli("export", chain / "stage2", "--out", tmp_path / "export")
    assert "vla.load" in r.output
    export = tmp_path / "export"
    m = _manifest(export)
    assert m["kind"] == "export" and m["inputs"]["model"]["digest"] == _manifest(chain / "stage2")["digest"]
    # the LM alone, in transformers' layout, with every special token the artifact recorded
    assert (export / "lm" / "model.safetensors").is_file() and (export / "mmgem.safetensors").is_file()
    lm = AutoModelForCausalLM.from_pretrained(export / "lm", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(export / "lm", local_files_only=True)
    tokens = _manifest(chain / "stage2")["mmgem"]["tokens"]
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in tokens} == tokens
    source = load_mmgem(chain / "stage2" / "model")
    assert lm.get_input_embeddings().weight.shape == source.lm.get_input_embeddings().weight.shape
    assert torch.equal(lm.get_input_embeddings().weight, source.lm.get_input_embeddings().weight)  # soft prompts too

    model = vla.load(export)
    images, texts = _images(3), ["a large red circle in the top left", "two shapes on a blue background"]
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 4.0, 30.0, 28.0]])] * 3
    assert torch.equal(model.encode_image(images), source.encode_image(images))
    assert torch.equal(model.encode_text(texts), source.encode_text(texts))
    assert torch.equal(model.encode_regions(images, boxes), source.encode_regions(images, boxes))
    assert model.caption(images) == source.caption(images)
    assert model.caption(images, boxes) == source.caption(images, boxes)  # regions: the soft prompts
    assert len(model.caption(images, boxes)) == 6
    card = (export / "README.md").read_text()
    assert "library_name: vla" in card and 'AutoModelForCausalLM.from_pretrained("export/lm")' in card
    assert "| `[CAP_4]` |" in card and "encode_regions" in card and "stage2-roi" in card
    # `vla eval` scores the export like the artifact it came from
    cli("eval", chain / "stage2", export, "--data", chain / "world", "--sets", "retrieval", "--out", tmp_path / "eval")
    rows = _manifest(tmp_path / "eval")["metrics"]
    scored = next(v for k, v in rows.items() if k.endswith("(export)"))["retrieval"]
    stage2 = next(v for k, v in rows.items() if k.endswith("(stage2)"))["retrieval"]
    assert scored == stage2


def test_an_lm_tokenizer_without_the_recorded_tokens_is_refused_by_export_and_load(chain, tmp_path) -> None:
    import shutil

    import vla
    from vla.errors import UserError

    # a stage-2 artifact whose lm/ tokenizer was swapped for stage 1's (no soft prompts)
    broken = tmp_path / "stage2"
    shutil.copytree(chain / "stage2", broken)
    for f in (chain / "joint" / "model" / "lm").glob("*token*"):
        shutil.copy2(f, broken / "model" / "lm" / f.name)
    r = runner.invoke(app, ["export", str(broken), "--out", str(tmp_path / "export")])
    assert r.exit_code == 2 and "the tokenizer lacks [CAP_1], [CAP_2], [CAP_3], [CAP_4]" in r.output.replace("\n", "")
    assert not (tmp_path / "export").exists()
    # and an export whose tokenizer was swapped after the fact is refused by vla.load
    cli("export", chain / "stage2", "--out", tmp_path / "good")
    for f in (chain / "joint" / "model" / "lm").glob("*token*"):
        shutil.copy2(f, tmp_path / "good" / "lm" / f.name)
    with pytest.raises(UserError, match=r"lacks \[CAP_1\].*load the LM and tokenizer saved beside it"):
        vla.load(tmp_path / "good")


# --- make mmgem -----------------------------------------------------------------------------------------

REAL_MMGEM = ["NPROC=8", "VISION=clip-vit-l", "LLM=tinyllama", "DATA=/data/shards/{00000..00999}.tar",
              "EVAL=/data/evalsets", "MMGEM_RECIPES=recipes/gpu/mmgem", "MMGEM_RUNS=runs/mmgem-vitl"]


def _make_n(*args) -> list[str]:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["make", "-n", "mmgem", *args], cwd=root, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k not in ("VISION", "LLM", "VLA_ONLINE")})
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.replace("\\\n", " ").splitlines() if "bin/vla " in ln]


def test_make_n_mmgem_real_line_trains_every_arm_under_torchrun_with_its_own_paths() -> None:
    cmds = _make_n(*REAL_MMGEM)
    stage = {c.split("--out ")[1].split()[0]: c for c in cmds if "--out " in c}
    arms = {"runs/mmgem-vitl/joint": "joint-train.yaml", "runs/mmgem-vitl/embed-only": "joint-train-embed.yaml",
            "runs/mmgem-vitl/caption-only": "joint-train-caption.yaml"}
    for out, recipe in arms.items():
        c = stage[out]
        assert "torchrun --standalone --nproc-per-node 8 .venv/bin/vla joint-train" in c, c
        assert "--vision clip-vit-l --llm tinyllama" in c and f"--recipe recipes/gpu/mmgem/{recipe}" in c
        assert "--data '/data/shards/{00000..00999}.tar'" in c  # braces reach vla, not bash
    s2 = stage["runs/mmgem-vitl/stage2"]
    assert "torchrun" in s2 and "stage2-roi" in s2 and "--init runs/mmgem-vitl/joint" in s2
    ev = stage["runs/mmgem-vitl/eval"]
    assert "torchrun" not in ev and "--data '/data/evalsets'" in ev and "--recipe recipes/gpu/mmgem/eval-mmgem.yaml" in ev
    # the base CLIP, stage 1, stage 2 and both arms side by side
    assert ev.split("vla eval ")[1].split(" --data")[0].split() == [
        "clip-vit-l", "runs/mmgem-vitl/joint", "runs/mmgem-vitl/stage2", "runs/mmgem-vitl/embed-only",
        "runs/mmgem-vitl/caption-only"]
    assert "vla export runs/mmgem-vitl/stage2" in stage["exports/mmgem-vitl"]  # MMGEM_EXPORT follows MMGEM_RUNS
    assert not any(" pretrain " in c or " synth " in c for c in cmds)  # a VISION is given: no small CLIP


def test_make_n_mmgem_embedded_shares_the_proclip_world_and_base_clip(tmp_path) -> None:
    """The embedded make mmgem builds the world, the base CLIP and the pre-trained LM once each;
    the joint, embed-only and caption-only arms all start from that LM."""
    cmds = _make_n(f"WORLD={tmp_path}/toy", f"RUNS={tmp_path}/runs", f"MMGEM_RUNS={tmp_path}/mm")
    assert any(f"vla synth --out {tmp_path}/toy" in c for c in cmds)
    assert any(f"vla pretrain --data '{tmp_path}/toy' --out {tmp_path}/runs/clip" in c for c in cmds)
    lm = [c for c in cmds if " pretrain-lm " in c]
    assert len(lm) == 1 and f"--data '{tmp_path}/toy' --out {tmp_path}/mm/lm" in lm[0]
    assert "--recipe recipes/embedded/mmgem/pretrain-lm.yaml" in lm[0]
    for arm in ("joint", "embed-only", "caption-only"):
        c = next(c for c in cmds if f"--out {tmp_path}/mm/{arm} " in c)
        assert f"--vision {tmp_path}/runs/clip --llm {tmp_path}/mm/lm " in c and "torchrun" not in c
    joint = next(c for c in cmds if f"--out {tmp_path}/mm/joint " in c)
    assert "--recipe recipes/embedded/mmgem/joint-train.yaml" in joint
    assert any("--out exports/mm " in c + " " for c in cmds)


def test_make_n_mmgem_sweep_scores_every_choice_on_the_val_split(tmp_path) -> None:
    """make mmgem-sweep: make mmgem's arms plus stage 1 at each other gen_weight, a second seed of
    joint and embed-only, stage 2 with image captions, all in one `vla eval` with split val."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["make", "-n", "mmgem-sweep", f"WORLD={tmp_path}/toy", f"RUNS={tmp_path}/runs",
                        f"MMGEM_RUNS={tmp_path}/mm", "MMGEM_GEN_WEIGHTS=0.25 2"], cwd=root, capture_output=True,
                       text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k not in ("VISION", "LLM", "VLA_ONLINE")})
    assert r.returncode == 0, r.stderr
    cmds = [ln for ln in r.stdout.replace("\\\n", " ").splitlines() if "bin/vla " in ln]
    stage = {c.split("--out ")[1].split()[0]: c for c in cmds if "--out " in c}
    sweep = f"{tmp_path}/mm-sweep"
    for w in ("0.25", "2"):
        c = stage[f"{sweep}/joint-gen{w}"]
        assert "--recipe recipes/embedded/mmgem/joint-train.yaml" in c and f"--set gen_weight={w} " in c
    assert "--set train.seed=1 " in stage[f"{sweep}/joint-seed1"]
    assert "joint-train-embed.yaml --set train.seed=1 " in stage[f"{sweep}/embed-only-seed1"]
    assert f"--init {tmp_path}/mm/joint " in stage[f"{sweep}/stage2-regions-only"]
    assert "--set image_captions=false " in stage[f"{sweep}/stage2-regions-only"]
    ev = stage[f"{sweep}/eval"]
    assert "--set split=val " in ev
    assert ev.split("vla eval ")[1].split(" --data")[0].split() == [
        f"{tmp_path}/mm/joint", f"{tmp_path}/mm/embed-only", f"{tmp_path}/mm/caption-only", f"{sweep}/joint-gen0.25",
        f"{sweep}/joint-gen2", f"{tmp_path}/mm/stage2", f"{sweep}/stage2-regions-only", f"{sweep}/joint-seed1",
        f"{sweep}/embed-only-seed1"]


@pytest.mark.parametrize("recipes", ["recipes/embedded/mmgem", "recipes/gpu/mmgem"])
def test_the_ablation_arms_have_stage_1s_budget(recipes) -> None:
    # same data, steps, batch, rates and model: only the objective differs
    from dataclasses import asdict

    from vla.recipes import load_recipe
    from vla.stages.joint_train import JointTrainRecipe

    joint = asdict(load_recipe(JointTrainRecipe, f"{recipes}/joint-train.yaml", kind="joint-train"))
    assert joint.pop("objective") == "joint"
    for objective in ("embed", "caption"):
        arm = asdict(load_recipe(JointTrainRecipe, f"{recipes}/joint-train-{objective}.yaml", kind="joint-train"))
        assert arm.pop("objective") == objective and arm == joint


def test_make_mmgem_runs_the_smoke_curriculum_and_a_second_run_does_nothing(chain, tmp_path) -> None:
    # world (chain's, as make proclip leaves it) → base CLIP → joint-train → stage2-roi → the two
    # arms → eval side by side → export; then again: everything is up to date
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    make_vars = [f"WORLD={chain / 'world'}", f"RUNS={tmp_path / 'runs'}", f"MMGEM_RUNS={tmp_path / 'mm'}",
                 f"MMGEM_EXPORT={tmp_path / 'export'}", "RECIPES=recipes/smoke", "SYNTH_RECIPE=recipes/smoke/synth.yaml"]
    env = {k: v for k, v in os.environ.items() if k not in ("VISION", "LLM")}
    runs = []
    for _ in range(2):
        r = subprocess.run(["make", "mmgem", *make_vars], cwd=root, capture_output=True, text=True,
                           env={**env, "HF_HUB_OFFLINE": "1", "VLA_NO_PROGRESS": "1"}, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs.append(r.stdout)
    first, second = runs
    assert "vla synth" not in first and "vla pretrain" in first  # the world is shared, the base CLIP built once
    for stage in ("vla joint-train", "vla stage2-roi", "vla eval", "vla export"):
        assert stage in first and stage not in second
    mm = tmp_path / "mm"
    assert [_manifest(mm / arm)["recipe"]["objective"] for arm in ("joint", "embed-only", "caption-only")] == [
        "joint", "embed", "caption"]
    assert _manifest(mm / "joint")["inputs"]["vision"]["digest"] == _manifest(tmp_path / "runs" / "clip")["digest"]
    assert _manifest(mm / "stage2")["inputs"]["init"]["digest"] == _manifest(mm / "joint")["digest"]
    rows = list(_manifest(mm / "eval")["metrics"])
    assert len(rows) == 5 and all(any(f"({name})" in row for row in rows)
                                  for name in ("clip", "joint", "stage2", "embed-only", "caption-only"))
    assert _manifest(tmp_path / "export")["inputs"]["model"]["digest"] == _manifest(mm / "stage2")["digest"]
    table = (mm / "eval" / "results.md").read_text()
    assert "MM-GEM curriculum" in first and table.strip() in first and table.strip() in second
