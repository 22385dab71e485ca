"""`vla pretrain-lm` through the CLI on a tiny world: the embedded LM learns the captions (held-out
perplexity recorded, below the untrained LM's), its artifact loads as a transformers causal LM, and
`joint-train --llm <artifact>` starts from exactly those weights (another kind is refused)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import cli


WORLD = ["--recipe", "recipes/smoke/synth.yaml", "--set", "n_train=32", "--set", "n_val=8", "--set", "n_test=12",
         "--set", "shard_size=16"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-lm")
    cli("synth", "--out", root / "world", *WORLD)
    r = cli("pretrain-lm", "--data", root / "world", "--out", root / "lm", "--recipe", "recipes/smoke/mmgem/pretrain-lm.yaml")
    assert "held-out perplexity" in r.output
    return root


def test_pretrain_lm_records_a_held_out_perplexity_below_the_untrained_lms(lm) -> None:
    """The manifest's held-out perplexity (the world's val split) is measured before and after
    training, and training lowers it well below the untrained LM's."""
    m = json.loads((lm / "lm" / "manifest.json").read_text())
    assert m["kind"] == "pretrain-lm"
    ppl, at_init = m["metrics"]["val_perplexity"], m["metrics"]["val_perplexity_at_init"]
    assert 1.0 < ppl < 0.5 * at_init
    assert m["counts"]["captions"]["held_out"] > 0 and "val split" in m["lm"]["held_out_from"]


def test_the_artifact_is_a_transformers_causal_lm_and_joint_train_starts_from_it(lm, tmp_path) -> None:
    """`model/` loads with AutoModelForCausalLM/AutoTokenizer; joint-train --llm <artifact> records
    it as its llm input and its LM starts from those weights (new mode-token rows aside)."""
    from transformers import AutoModelForCausalLM

    from vla.models.mmgem import build_mmgem
    from vla.stages.joint_train import llm_source

    base = AutoModelForCausalLM.from_pretrained(lm / "lm" / "model", local_files_only=True)
    name, inputs = llm_source(str(lm / "lm"))
    model = build_mmgem("vla-micro-clip", name)
    rows = base.get_input_embeddings().weight.shape[0]
    assert torch.equal(model.lm.get_input_embeddings().weight[:rows], base.get_input_embeddings().weight)
    assert torch.equal(model.lm.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert inputs["llm"].kind == "pretrain-lm"

    cli("joint-train", "--data", lm / "world", "--out", tmp_path / "joint", "--recipe", "recipes/smoke/mmgem/joint-train.yaml",
        "--llm", lm / "lm", "--set", "train.steps=1", "--set", "eval.sets=[]")
    m = json.loads((tmp_path / "joint" / "manifest.json").read_text())
    assert m["inputs"]["llm"]["kind"] == "pretrain-lm"
    assert m["mmgem"]["lm"]["pretrain_lm"]["val_perplexity"] < m["mmgem"]["lm"]["pretrain_lm"]["val_perplexity_at_init"]


def test_joint_train_refuses_an_llm_artifact_of_another_kind(lm, tmp_path) -> None:
    """--llm naming an artifact that is not a pretrain-lm is one line naming the kinds, exit 2."""
    r = cli("joint-train", "--data", lm / "world", "--out", tmp_path / "joint", "--recipe",
            "recipes/smoke/mmgem/joint-train.yaml", "--llm", lm / "world", code=2)
    assert "pretrain-lm" in r.output and "synth" in r.output


def test_joint_train_records_claim_a_gradient_norms_and_loss_curves(lm, tmp_path) -> None:
    """The joint-train manifest holds each objective's gradient norm and their cosine on the LM,
    the tower and h1 before training and after the probe steps, both loss curves, and the loss
    weights: L_emb summed over its two directions (the paper), w_gen labelled when not 1."""
    cli("joint-train", "--data", lm / "world", "--out", tmp_path / "joint", "--recipe", "recipes/smoke/mmgem/joint-train.yaml",
        "--llm", lm / "lm", "--set", "train.steps=2", "--set", "train.log_every=1", "--set", "eval.sets=[]",
        "--set", "gen_weight=0.5")
    m = json.loads((tmp_path / "joint" / "manifest.json").read_text())["mmgem"]
    assert [r["step"] for r in m["gradient_norms"]] == [0, 1, 2]
    for record in m["gradient_norms"]:
        assert set(record["groups"]) == {"lm", "vision", "h1"}
        for group in record["groups"].values():
            assert group["emb_grad_norm"] > 0 and group["gen_grad_norm"] > 0 and -1 <= group["cosine"] <= 1
    curves = m["loss_curves"]
    assert curves["step"] == [1, 2] and len(curves["emb"]) == len(curves["gen"]) == 2
    for loss, emb, gen in zip(curves["loss"], curves["emb"], curves["gen"]):
        assert loss == pytest.approx(2 * emb + 0.5 * gen, rel=1e-5)
    assert m["loss_weights"]["emb"] == 2.0 and "L_gen weighted 0.5" in m["loss_weights"]["deviation_from_paper"]
