"""MM-GEM's model (h1–h4, the PoolAggregator, [EMB]/[CAP], captioning) and losses, on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vla.errors import UserError
from vla.losses import caption_loss, mmgem_objective_loss
from vla.models.mmgem.causal_lm import add_mode_tokens, build_tiny_llama, check_mode_tokens, lm_checkpointing
from vla.models.clip import load_clip
from vla.models.mmgem import (
    IGNORE_INDEX,
    MMGEM,
    MMGEMConfig,
    greedy_decode_without_cache,
)
from vla.models.mmgem.pool_aggregator import RoIPool, boxes_to_input_frame, check_boxes, mean_pool

CAPTIONS = [
    "a small red circle on a white background",
    "a large blue square to the left of a green triangle",
    "two yellow stars above a purple rectangle",
    "the orange circle is below the big black square",
]
PREFIX = 2  # P: V_in vectors
SOFT = 3  # n: soft prompts


def _model(**config: object) -> MMGEM:
    """vla-micro-clip's tower (32 px, patch 8 → a 4×4 grid, width 32, D 32) + a tiny Llama (d 64)."""
    clip = load_clip("vla-micro-clip")
    lm, tokenizer = build_tiny_llama(CAPTIONS)
    cfg = MMGEMConfig(**{"prefix_length": PREFIX, "soft_prompts": SOFT, "max_text_tokens": 24, **config})
    return MMGEM(clip.model.visual, lm, tokenizer, cfg, preprocess=clip.preprocess)


@pytest.fixture(scope="module")
def model() -> MMGEM:
    return _model().eval()


def _pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


BOXES = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 4.0, 32.0, 30.0]]), torch.tensor([[4.0, 4.0, 20.0, 28.0]])]


# --- h1–h4 ---------------------------------------------------------------------------------------


def test_h1_to_h4_shapes(model: MMGEM) -> None:
    px = _pixels()
    with torch.no_grad():
        fmap = model.tower(px)
        v = model.image_embedding(px)
        regions = model.region_embedding(px, BOXES)
        v_in = model.visual_prefix(v)
        t = model.text_embedding(CAPTIONS[:3])
    assert fmap.shape == (2, 32, 4, 4)  # (B, width, 32/8, 32/8): the patch-token feature map
    assert v.shape == (2, 32)  # h1: D = the CLIP's embed_dim
    assert regions.shape == (3, 32)  # h4 ∘ h1 ∘ RoIAlign: one row per box, in image order
    assert v_in.shape == (2, PREFIX, 64)  # h3: P vectors in the LM's input-embedding space
    assert t.shape == (3, 32)  # h2 on the [EMB] state


def test_h1_starts_as_the_clip_projection_of_the_mean_pooled_tokens() -> None:
    clip = load_clip("vla-micro-clip")
    proj = clip.model.visual.proj.detach().clone()
    lm, tokenizer = build_tiny_llama(CAPTIONS)
    model = MMGEM(clip.model.visual, lm, tokenizer, MMGEMConfig(max_text_tokens=8))
    px = _pixels()
    with torch.no_grad():
        expected = mean_pool(model.tower(px)) @ proj
        assert torch.allclose(model.image_embedding(px), expected, atol=1e-6)
    assert clip.model.visual.proj is None  # moved into h1: no gradient-less parameter left for DDP


def test_h4_is_initialised_to_the_identity(model: MMGEM) -> None:
    assert torch.equal(model.h4.weight, torch.eye(32)) and torch.equal(model.h4.bias, torch.zeros(32))
    px = _pixels()
    with torch.no_grad():
        assert torch.equal(model.region_embedding(px, BOXES), model.image_embedding(px, BOXES))

def test_the_training_forward_matches_regions_to_captions_through_h4() -> None:
    model = _model(max_text_tokens=8).eval()
    px = _pixels()
    with torch.no_grad():
        model.h4.weight.copy_(torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))
        out = model(px, CAPTIONS[:3], objective="joint", boxes=BOXES)
        assert torch.allclose(out["image"], F.normalize(model.region_embedding(px, BOXES), dim=-1), atol=1e-6)
        assert not torch.allclose(out["image"], F.normalize(model.image_embedding(px, BOXES), dim=-1), atol=1e-3)
        # while the caption path reads h3(h1(RoIAlign)), without h4
        prefix = model.visual_prefix(model.image_embedding(px, BOXES))
        row = torch.cat([prefix[2], model.prompt_embeddings(True),  # regions: the soft prompts by default
                         model._token_embeddings(model.tokenize(CAPTIONS[2:3])[0][0] + [model.eos_id])])
        assert torch.allclose(out["logits"][2, : row.shape[0]], model.lm(inputs_embeds=row[None]).logits[0], atol=1e-4)


# --- the PoolAggregator: RoIAlign against hand computations ---------------------------------------


def test_roi_align_on_a_known_feature_map_matches_a_hand_computed_value() -> None:
    # One channel, 2×2 patches of 8 px: feature (row i, col j) sits at pixel ((j+½)·8, (i+½)·8).
    fmap = torch.tensor([[[[0.0, 1.0], [2.0, 7.0]]]])
    pool = RoIPool(patch_size=8, output_size=1, sampling_ratio=1)
    # Box (4,4)-(8,8) px → feature coordinates (4/8 − ½ …) = (0, 0)-(0.5, 0.5); one bin, one
    # sample at its centre (0.25, 0.25). Bilinear: (1−x)(1−y)·f00 + x(1−y)·f01 + (1−x)y·f10 + xy·f11
    x = y = 0.25
    hand = (1 - x) * (1 - y) * 0 + x * (1 - y) * 1 + (1 - x) * y * 2 + x * y * 7  # = 1.0
    got = pool(fmap, [torch.tensor([[4.0, 4.0, 8.0, 8.0]])])
    assert got.shape == (1, 1) and got.item() == pytest.approx(hand, abs=1e-6) and hand == pytest.approx(1.0)


def test_roi_align_of_a_linear_map_is_its_value_at_the_box_centre() -> None:
    # f(i, j) = 3j − 2i + 1 on a 4×4 grid (patch 8): bilinear sampling is exact on a linear
    # function, so the mean over bins is f at the box centre in feature coordinates.
    i, j = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    fmap = (3 * j - 2 * i + 1)[None, None]
    box = [9.0, 6.0, 25.0, 22.0]  # centre (17, 14) px → feature (17/8 − ½, 14/8 − ½) = (1.625, 1.25)
    got = RoIPool(patch_size=8, output_size=2, sampling_ratio=2)(fmap, [torch.tensor([box])])
    assert got.item() == pytest.approx(3 * 1.625 - 2 * 1.25 + 1, abs=1e-5)


def test_roi_align_of_the_whole_image_with_one_bin_per_patch_is_the_mean_pool() -> None:
    fmap = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = [torch.tensor([[0.0, 0.0, 32.0, 32.0]])] * 2
    got = RoIPool(patch_size=8, output_size=4, sampling_ratio=1)(fmap, whole)
    assert torch.allclose(got, mean_pool(fmap), atol=1e-6)


def test_bad_region_boxes_are_refused_with_the_sample_key() -> None:
    for bad, why in [([1.0, 1.0, 1.0, 5.0], "empty"), ([0.0, float("nan"), 4.0, 4.0], "not finite"),
                     ([0.0, 0.0, 40.0, 8.0], "outside")]:
        with pytest.raises(UserError, match=f"sample-7.*{why}"):
            check_boxes(torch.tensor([bad]), 32, 32, "sample-7")
    check_boxes(torch.tensor([[0.0, 0.0, 32.0, 32.0]]), 32, 32, "sample-7")


def test_boxes_map_into_the_resized_and_centre_cropped_input() -> None:
    # 128×64 image, shortest side → 32: 64×32, centre crop 32 wide drops 16 px on the left.
    box = torch.tensor([[40.0, 8.0, 88.0, 40.0]])
    got = boxes_to_input_frame(box, (128, 64), 32, "shortest")
    assert got.tolist() == [[40 / 2 - 16, 8 / 2, 88 / 2 - 16, 40 / 2]]
    assert boxes_to_input_frame(box, (128, 64), 32, "squash").tolist() == [[10.0, 4.0, 22.0, 20.0]]


def test_the_resized_side_is_truncated_as_torchvisions_resize_computes_it() -> None:
    """640×480 at 224: torchvision's Resize(224) makes 298×224 (int, not round's 299), and the box
    map uses that size; checked against the resize open_clip's preprocessing really runs."""
    from PIL import Image
    from open_clip.transform import image_transform

    from vla.models.mmgem.pool_aggregator import resized_size

    for mode in ("shortest", "longest", "squash"):
        resize = image_transform(224, is_train=False, resize_mode=mode).transforms[0]
        for size in [(640, 480), (480, 640), (333, 101), (50, 77)]:
            assert resized_size(size, 224, mode) == resize(Image.new("RGB", size)).size
    assert resized_size((640, 480), 224) == (298, 224)
    box = torch.tensor([[0.0, 0.0, 640.0, 480.0]])
    assert boxes_to_input_frame(box, (640, 480), 224).tolist() == [[0.0, 0.0, 224.0, 224.0]]


def test_a_box_in_image_pixels_of_a_640x480_image_embeds_the_region_computed_by_hand(model: MMGEM) -> None:
    """encode_regions takes boxes in each image's own pixels: on a 640×480 image the result is
    h4(h1(RoIAlign)) of the box mapped by hand through the tower's resize (short side 480 → 32,
    long side int(32·640/480) = 42) and centre crop (round((42 − 32)/2) = 5 px off the left)."""
    from PIL import Image
    from torchvision.ops import roi_align

    rng = torch.Generator().manual_seed(3)
    image = Image.fromarray((torch.rand(480, 640, 3, generator=rng) * 255).byte().numpy())
    box = [320.0, 120.0, 560.0, 400.0]
    scale_x, scale_y, left = 42 / 640, 32 / 480, 5.0
    by_hand = torch.tensor([[box[0] * scale_x - left, box[1] * scale_y, box[2] * scale_x - left, box[3] * scale_y]])
    with torch.no_grad():
        fmap = model.tower(model.preprocess(image)[None])
        pooled = roi_align(fmap, [by_hand], output_size=model.config.roi_output_size, spatial_scale=1 / 8,
                           sampling_ratio=model.config.roi_sampling_ratio, aligned=True).mean(dim=(2, 3))
        expected = F.normalize(model.h4(model.h1(pooled)), dim=-1)
    got = model.encode_regions([image], [[box]])
    assert torch.allclose(got, expected, atol=1e-6)
    # the tower's input frame only when asked for, and a box outside its image refused with the size
    assert torch.allclose(model.encode_regions([image], [by_hand], box_frame="input"), expected, atol=1e-6)
    with pytest.raises(UserError, match=r"image 0: region box .* outside the 640×480 image"):
        model.encode_regions([image], [[[0.0, 0.0, 700.0, 10.0]]])
    with pytest.raises(UserError, match="box_frame='input'"):
        model.caption(model.preprocess(image)[None], [[box]])


# --- tokens and the embedding table ----------------------------------------------------------------


def test_emb_and_cap_tokens_are_added_and_the_embedding_table_resized() -> None:
    lm, tokenizer = build_tiny_llama(CAPTIONS)
    base = len(tokenizer)
    assert lm.get_input_embeddings().weight.shape[0] == base
    ids = add_mode_tokens(lm, tokenizer, ["[CAP_1]", "[CAP_2]"])
    assert len(tokenizer) == base + 4 and sorted(ids.values()) == list(range(base, base + 4))
    assert lm.get_input_embeddings().weight.shape[0] == base + 4
    assert lm.get_output_embeddings().weight.shape[0] == base + 4
    # special tokens stay whole inside text, and a second call (stage 2 reloading stage 1) changes nothing
    assert tokenizer("red [EMB]", add_special_tokens=False)["input_ids"][-1] == ids["[EMB]"]
    table = lm.get_input_embeddings().weight.detach().clone()
    assert add_mode_tokens(lm, tokenizer, ["[CAP_1]", "[CAP_2]"]) == ids
    assert torch.equal(lm.get_input_embeddings().weight, table)
    with pytest.raises(UserError, match=r"lacks \[CAP_3\]"):
        check_mode_tokens(tokenizer, ["[EMB]", "[CAP_3]"], "runs/x")


# --- the one LM call and the losses ----------------------------------------------------------------


def test_one_lm_call_gives_the_same_embeddings_and_logits_as_separate_forwards(model: MMGEM) -> None:
    px = _pixels()
    caps = CAPTIONS[:2]
    with torch.no_grad():
        out = model(px, caps)
        text_alone = F.normalize(model.text_embedding(caps), dim=-1)
        prefix = model.visual_prefix(model.image_embedding(px))
        for b, row in enumerate(model.tokenize(caps)[0]):  # row 0 is the shorter, padded one
            tokens = model._token_embeddings(row + [model.eos_id])
            gen_row = torch.cat([prefix[b], model.prompt_embeddings(False), tokens])
            logits_alone = model.lm(inputs_embeds=gen_row[None]).logits[0]
            assert torch.allclose(out["logits"][b, : gen_row.shape[0]], logits_alone, atol=1e-4)
    assert torch.allclose(out["text"], text_alone, atol=1e-5)  # padding and stacking leak nothing


def test_lgen_targets_cover_caption_tokens_only(model: MMGEM) -> None:
    caps = ["red circle", "a large blue square to the left"]
    ids, _ = model.tokenize(caps)
    assert len(ids[0]) < len(ids[1])
    with torch.no_grad():
        out = model(_pixels(), caps, objective="caption")
    targets, head = out["targets"], PREFIX + 1  # [V_in (P), [CAP]]
    for b, row in enumerate(ids):
        assert (targets[b, :head] == IGNORE_INDEX).all()  # the prefix and the prompt
        assert targets[b, head : head + len(row) + 1].tolist() == row + [model.eos_id]
        assert (targets[b, head + len(row) + 1 :] == IGNORE_INDEX).all()  # padding
    assert out["logits"].shape[:2] == targets.shape


def test_lgen_ignores_prefix_and_padding_positions_by_hand() -> None:
    # Inputs [V_in, V_in, [CAP], c1, c2, eos] and a shorter row [V_in, V_in, [CAP], c1, eos, pad].
    targets = torch.tensor([[-100, -100, -100, 4, 1, 0], [-100, -100, -100, 2, 0, -100]])
    logits = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def nll(b: int, pos: int) -> float:  # position pos−1 predicts the token at pos
        row = logits[b, pos - 1].tolist()
        return math.log(sum(math.exp(x) for x in row)) - row[targets[b, pos].item()]

    hand = (nll(0, 3) + nll(0, 4) + nll(0, 5) + nll(1, 3) + nll(1, 4)) / 5
    assert caption_loss(logits, targets).item() == pytest.approx(hand, rel=1e-12)
    # the logits at positions that predict prefix, prompt or padding tokens do not matter
    scrambled = logits.clone()
    scrambled[:, :2] = 100 * torch.randn(2, 2, 5, dtype=torch.float64)
    scrambled[1, 4:] = -50.0
    assert caption_loss(scrambled, targets).item() == pytest.approx(hand, rel=1e-12)


def test_objective_switch_computes_only_the_paths_it_needs(model: MMGEM) -> None:
    px, caps = _pixels(), CAPTIONS[:2]
    with torch.no_grad():
        joint = model(px, caps, objective="joint")
        embed = model(px, caps, objective="embed")
        cap = model(px, caps, objective="caption")
    assert "logits" not in embed and "text" not in cap
    keys = ("image", "text", "logit_scale", "logits", "targets")
    l_joint = mmgem_objective_loss("joint", **{k: joint[k] for k in keys})
    l_embed = mmgem_objective_loss("embed", **{k: embed[k] for k in keys if k in embed})
    l_cap = mmgem_objective_loss("caption", **{k: cap[k] for k in keys if k in cap})
    assert set(l_embed) == {"loss", "emb"} and set(l_cap) == {"loss", "gen"}
    assert l_joint["loss"].item() == pytest.approx(l_embed["loss"].item() + l_cap["loss"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs logits"):
        mmgem_objective_loss("joint", image=joint["image"], text=joint["text"], logit_scale=joint["logit_scale"])
    with pytest.raises(UserError, match="objective"):
        model(px, caps, objective="both")


def test_temperature_starts_at_0_07_and_is_bounded_below_by_0_01() -> None:
    model = _model(max_text_tokens=8)
    assert model.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(math.log(1 / 0.001))  # τ = 0.001 asked for
    scale = model.logit_scale()
    assert scale.item() == pytest.approx(100.0, rel=1e-6)  # τ clamped at 0.01
    scale.backward()
    assert model.logit_scale.log_scale.grad.item() == 0.0  # no push past the bound


def test_long_captions_are_cut_at_max_text_tokens_and_counted(model: MMGEM) -> None:
    long = " ".join(CAPTIONS * 3)
    with torch.no_grad():
        out = model(_pixels(), [long, "red"], objective="caption")
    assert out["truncated"] == 1
    assert (out["targets"][0] != IGNORE_INDEX).sum().item() == 24 + 1  # max_text_tokens + end of text
    assert model.text_token_counts([long])[0] > 24


# --- what each phase trains ------------------------------------------------------------------------


def test_stage2_phases_train_only_h4_or_h3_and_the_soft_prompts() -> None:
    model = _model(max_text_tokens=8)
    groups = model.trainable_parameters("region-retrieval")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["h4.weight", "h4.bias"]
    assert sum(len(g) for g in groups.values()) == 2

    model.trainable_parameters("region-caption")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"h3.weight", "h3.bias", "soft_prompts"}
    with torch.no_grad():
        model.soft_prompts.add_(1.0)
    expected = model.soft_prompts.detach().clone()
    model.merge_soft_prompts()
    table = model.lm.get_input_embeddings().weight
    assert model.soft_prompts is None and torch.equal(table[model.soft_prompt_ids], expected)


# --- captioning ------------------------------------------------------------------------------------


def test_greedy_caption_with_kv_cache_equals_token_by_token_decoding_without_cache() -> None:
    model = _model(max_text_tokens=12).double().eval()  # float64: no argmax ties flipped by rounding
    px = _pixels(3).double()
    cached = model.generate_ids(px, max_new_tokens=10)
    with torch.no_grad():
        naive = greedy_decode_without_cache(model, model.caption_inputs(px), max_new_tokens=10)
    assert cached == naive and all(len(row) > 0 for row in cached)
    # regions decode through the soft prompts, batched over all boxes
    region_ids = model.generate_ids(px[:2], BOXES, max_new_tokens=6)
    with torch.no_grad():
        region_naive = greedy_decode_without_cache(model, model.caption_inputs(px[:2], BOXES), max_new_tokens=6)
    assert region_ids == region_naive and len(region_ids) == 3
    beams = model.caption(px, num_beams=3, max_new_tokens=6)
    assert len(beams) == 3 and all(isinstance(c, str) for c in beams)


def test_lm_save_pretrained_reloads_with_identical_logits(model: MMGEM, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model.lm.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    lm = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "a red circle [CAP] [EMB]"
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    check_mode_tokens(tokenizer, ["[EMB]", "[CAP]", "[CAP_1]", "[CAP_3]"], str(tmp_path))
    with torch.no_grad():
        before = model.lm(torch.tensor([ids])).logits
        after = lm(torch.tensor([ids])).logits
    assert torch.equal(before, after)


# --- on disk and the DualEncoder interface ---------------------------------------------------------


def _images(n: int) -> list:
    from PIL import Image

    rng = torch.Generator().manual_seed(5)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=rng) * 255).byte().numpy()) for _ in range(n)]


def test_saved_mmgem_reloads_with_identical_embeddings_and_greedy_captions(tmp_path) -> None:
    from vla.models.encoder import DualEncoder
    from vla.models.mmgem import build_mmgem, load_mmgem, save_mmgem

    model = build_mmgem("vla-micro-clip", None, CAPTIONS, MMGEMConfig(soft_prompts=2, max_text_tokens=10)).eval()
    model.trainable_parameters("region-caption")
    with torch.no_grad():
        model.soft_prompts.mul_(3.0)  # a "trained" soft prompt must survive the export
    images, boxes = _images(2), [torch.tensor([[0.0, 0.0, 20.0, 20.0]]), torch.tensor([[8.0, 8.0, 32.0, 24.0]])]
    regions_before = model.caption(images, boxes, max_new_tokens=6)
    save_mmgem(model, tmp_path / "m")
    loaded = load_mmgem(tmp_path / "m")

    assert isinstance(loaded, DualEncoder)
    for a, b in [(model.encode_image(images), loaded.encode_image(images)),
                 (model.encode_text(CAPTIONS), loaded.encode_text(CAPTIONS)),
                 (model.encode_regions(images, boxes), loaded.encode_regions(images, boxes))]:
        assert torch.equal(a, b) and torch.allclose(a.norm(dim=-1), torch.ones(len(a)))
    assert loaded.caption(images, max_new_tokens=6) == model.caption(images, max_new_tokens=6)
    assert loaded.caption(images, boxes, max_new_tokens=6) == regions_before


def test_a_tokenizer_without_the_recorded_tokens_is_refused(tmp_path) -> None:
    from transformers import AutoTokenizer

    from vla.models.mmgem import build_mmgem, load_mmgem, save_mmgem

    save_mmgem(build_mmgem("vla-micro-clip", None, CAPTIONS, MMGEMConfig(max_text_tokens=8)), tmp_path / "m")
    base_tokenizer = build_tiny_llama(CAPTIONS)[1]  # the base LM's tokenizer: no [EMB], no [CAP]
    base_tokenizer.save_pretrained(tmp_path / "m" / "lm")
    assert "[EMB]" not in AutoTokenizer.from_pretrained(tmp_path / "m" / "lm").get_vocab()
    with pytest.raises(UserError, match=r"lacks \[EMB\], \[CAP\]"):
        load_mmgem(tmp_path / "m")


# --- gradient checkpointing ------------------------------------------------------------------------


def _loss_and_grads(trainer, pixels, captions):
    trainer.zero_grad(set_to_none=True)
    loss = trainer(pixels, captions)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.named_parameters() if p.grad is not None}


def test_grad_checkpointing_of_tower_and_lm_gives_the_same_loss_and_gradients() -> None:
    """train.grad_checkpointing on MMGEMTrainer (open_clip's switch on the tower, transformers'
    gradient_checkpointing_enable on the LM): the joint loss and every gradient are unchanged,
    and the LM's layers really do checkpoint."""
    from vla.losses import ClipLoss
    from vla.models.mmgem.objective import MMGEMTrainer

    model = _model()
    model.trainable_parameters("joint")
    trainer = MMGEMTrainer(model, "joint", ClipLoss()).train()
    pixels, captions = _pixels(4), CAPTIONS
    loss, grads = _loss_and_grads(trainer, pixels, captions)
    trainer.set_grad_checkpointing(True)
    assert model.tower.visual.transformer.grad_checkpointing and lm_checkpointing(model.lm)
    loss_ckpt, grads_ckpt = _loss_and_grads(trainer, pixels, captions)
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-6, rtol=1e-5), name


def test_the_training_loop_accepts_grad_checkpointing_for_mmgem(tmp_path) -> None:
    """train.grad_checkpointing=true is honoured for MMGEMTrainer (the loop refuses models that
    cannot checkpoint): a step runs and the switch is on."""
    from vla.losses import ClipLoss
    from vla.models.mmgem.objective import MMGEMTrainer
    from vla.train import TrainConfig, train

    model = _model()
    model.trainable_parameters("joint")
    trainer = MMGEMTrainer(model, "joint", ClipLoss()).train()
    batch = {"pixels": _pixels(4), "captions": CAPTIONS}
    cfg = TrainConfig(steps=1, batch_size=4, warmup_steps=0, grad_checkpointing=True, device="cpu")
    result = train(cfg, trainer, lambda m, b: m(b["pixels"], b["captions"]), lambda s: iter([batch]), tmp_path)
    assert result.steps == 1 and lm_checkpointing(model.lm)


# --- BOS, bf16 regions ------------------------------------------------------------------------------


def test_caption_rows_start_with_bos_as_embedding_rows_do_for_an_lm_that_has_one() -> None:
    """With a BOS token (as TinyLlama has), training caption rows are [BOS, V_in, [CAP], caption,
    eos] and decoding starts from [BOS, V_in, [CAP]]: the first caption token's training logits
    equal the LM's next-token logits on the decoding input."""
    clip = load_clip("vla-micro-clip")
    lm, tokenizer = build_tiny_llama(CAPTIONS)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    lm.resize_token_embeddings(len(tokenizer))
    model = MMGEM(clip.model.visual, lm, tokenizer, MMGEMConfig(prefix_length=PREFIX, max_text_tokens=24),
                  preprocess=clip.preprocess).eval()
    bos = tokenizer.bos_token_id
    pixels = _pixels(2)
    with torch.no_grad():
        inputs = model.caption_inputs(pixels)
        assert inputs.shape[1] == 1 + PREFIX + 1
        assert torch.equal(inputs[:, 0], model.lm.get_input_embeddings().weight[bos].expand(2, -1))
        out = model(pixels, CAPTIONS[:2], objective="caption")
        head = 1 + PREFIX + 1
        assert (out["targets"][:, :head] == -100).all() and (out["targets"][:, head] != -100).all()
        decoding = model.lm(inputs_embeds=inputs).logits[:, -1]
    assert torch.allclose(out["logits"][:, head - 1], decoding, atol=1e-5)


def test_a_bf16_model_embeds_regions_with_roialign_in_fp32(model: MMGEM) -> None:
    """RoIAlign runs in fp32 whatever the model's dtype (torchvision's CPU kernel has no bf16): a
    bf16 copy of the model embeds regions, close to the fp32 model's embedding."""
    import copy

    from PIL import Image

    rng = torch.Generator().manual_seed(4)
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=rng) * 255).byte().numpy())]
    boxes = [[[4.0, 4.0, 30.0, 36.0]]]
    half = copy.deepcopy(model).to(torch.bfloat16)
    half.preprocess = lambda im: model.preprocess(im).to(torch.bfloat16)
    got = half.encode_regions(images, boxes)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert F.cosine_similarity(got, model.encode_regions(images, boxes)).item() > 0.98
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = model.roi_pool(torch.randn(1, 32, 4, 4, dtype=torch.bfloat16), [torch.tensor([[0.0, 0.0, 16.0, 16.0]])])
    assert pooled.dtype == torch.bfloat16


def test_objective_gradient_norms_are_those_of_each_term_alone() -> None:
    """`objective_gradient_norms` gives ‖∇(w_emb·L_emb)‖ and ‖∇(w_gen·L_gen)‖ per group, as a
    backward of each weighted term alone does, and their cosine; .grad is left untouched."""
    from vla.losses import ClipLoss
    from vla.models.mmgem.objective import MMGEMTrainer, objective_gradient_norms

    model = _model()
    model.trainable_parameters("joint")
    trainer = MMGEMTrainer(model, "joint", ClipLoss(), emb_weight=2.0, gen_weight=0.5).train()
    groups = {"lm": [p for p in model.lm.parameters() if p.requires_grad], "h1": list(model.h1.parameters())}
    pixels = _pixels(4)
    record = objective_gradient_norms(trainer, pixels, CAPTIONS, groups)
    assert all(p.grad is None for p in trainer.parameters())
    by_term = {}
    for term, objective, weight in (("emb", "embed", 2.0), ("gen", "caption", 0.5)):
        trainer.zero_grad(set_to_none=True)
        out = model(pixels, CAPTIONS, objective=objective)
        loss = mmgem_objective_loss(objective, **{k: out[k] for k in ("image", "text", "logit_scale", "logits",
                                                                       "targets") if k in out})["loss"]
        (weight * loss).backward()
        by_term[term] = {g: torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                       for p in ps]) for g, ps in groups.items()}
    for g in groups:
        got = record["groups"][g]
        assert got["emb_grad_norm"] == pytest.approx(float(by_term["emb"][g].norm()), rel=1e-4)
        assert got["gen_grad_norm"] == pytest.approx(float(by_term["gen"][g].norm()), rel=1e-4)
        assert got["cosine"] == pytest.approx(float(F.cosine_similarity(by_term["emb"][g], by_term["gen"][g], dim=0)),
                                              abs=1e-4)
