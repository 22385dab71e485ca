"""Evaluation metrics against hand-computed values; eval-set reading; the runner on a tiny model."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vla.errors import UserError
from vla.evaluate.captioning import bleu, captioning_metrics, cider_d, ptb_tokenize
from vla.evaluate.evalsets import find_eval_sets, load_eval_set
from vla.evaluate.retrieval import (BLOCK_ELEMENTS, MODES, block_rows, hit_probability, image_to_text_counts,
                                    reference_retrieval_metrics, retrieval_metrics, text_to_image_counts)
from vla.evaluate.run import evaluate_model, retrieval_examples
from vla.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics

# ---------------------------------------------------------------- retrieval

# texts × images scores; captions 0,1 → image 0, 2,3 → image 1, 4,5 → image 2
SCORES = torch.tensor([
    [0.9, 0.1, 0.2],  # own image first                         → rank 0
    [0.5, 0.5, 0.1],  # tied with image 1: the tie counts against → rank 1
    [0.3, 0.2, 0.8],  # two images above                        → rank 2
    [0.1, 0.7, 0.6],  #                                         → rank 0
    [0.6, 0.4, 0.3],  #                                         → rank 2
    [0.2, 0.7, 0.4],  #                                         → rank 1
])
OWNER = [0, 0, 1, 1, 2, 2]


def scored(scores: torch.Tensor):
    """Embeddings whose dot products are exactly `scores`: images = identity, texts = the rows."""
    return torch.eye(scores.shape[1]), scores.clone()


def test_retrieval_by_hand_with_ties_and_second_caption_hit():
    image_emb, text_emb = scored(SCORES)
    m = retrieval_metrics(image_emb, text_emb, OWNER, ks=(1, 2, 3), chunk=2, mode="pessimistic")
    # text→image ranks [0, 1, 2, 0, 2, 1]
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 6)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 6)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    # image→text: image 0's caption 0 is first (rank 0); image 1's best caption (0.7) ties with
    # caption 5 of image 2 (rank 1); image 2 is found only through its second caption (0.4),
    # behind captions 2 and 3 (rank 2), while its first caption (0.3) is 4th
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@3"] == pytest.approx(1.0)
    assert m["mean_recall"] == pytest.approx((2 / 6 + 4 / 6 + 1 + 1 / 3 + 2 / 3 + 1) / 6)


def test_tied_captions_of_the_same_image_do_not_count_against_it():
    image_emb, text_emb = scored(torch.tensor([[0.5, 0.1], [0.5, 0.2], [0.3, 0.4]]))
    for mode in MODES:
        m = retrieval_metrics(image_emb, text_emb, [0, 0, 1], ks=(1,), mode=mode)
        assert m["text_retrieval_recall@1"] == 1.0
        assert m["text_retrieval_ties"] == 0


def test_constant_model_in_each_mode():
    n = 4
    args = (torch.ones(n, 8), torch.ones(2 * n, 8), [i // 2 for i in range(2 * n)])
    m = retrieval_metrics(*args, ks=(1, n - 1, n), mode="pessimistic")
    assert m["image_retrieval_recall@1"] == 0.0 and m["text_retrieval_recall@1"] == 0.0
    assert m[f"image_retrieval_recall@{n - 1}"] == 0.0  # pessimistic: last among N
    assert m[f"image_retrieval_recall@{n}"] == 1.0
    assert m["image_retrieval_ties"] == 2 * n and m["text_retrieval_ties"] == n
    # expected: text→image K / N exactly; image→text 1 − C(6, K)/C(8, K) (2 of 8 captions its own)
    m = retrieval_metrics(*args, ks=(1, 2, n), mode="expected")
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / n)
    assert m["image_retrieval_recall@2"] == pytest.approx(2 / n)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 8)
    assert m["text_retrieval_recall@2"] == pytest.approx(1 - (6 * 5) / (8 * 7))
    # clip_benchmark: whatever topk picks, as CLIP_benchmark's own code picks it
    want = reference_retrieval_metrics(*args, ks=(1, 2, n), batch_size=3)
    got = retrieval_metrics(*args, ks=(1, 2, n), chunk=3)
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-7)


def test_expected_recall_by_hand_with_a_tie_group():
    # one text; image 0 is its own, scored 0.5 like images 1 and 2; image 3 scores above
    image_emb, text_emb = scored(torch.tensor([[0.5, 0.5, 0.5, 0.9]]))
    m = retrieval_metrics(image_emb, text_emb, [0], ks=(1, 2, 3, 4), mode="expected")
    # g = 1, e = 2: P(hit@K) = clamp(K − 1, 0, 3) / 3
    assert [m[f"image_retrieval_recall@{k}"] for k in (1, 2, 3, 4)] == \
        pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert m["image_retrieval_ties"] == 1


def test_image_without_captions_is_a_miss():
    image_emb, text_emb = scored(torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]]))
    for mode in MODES:
        # K = 5 is more than the 2 captions there are: still a miss for the caption-less image
        m = retrieval_metrics(image_emb, text_emb, [0, 1], ks=(1, 5), mode=mode)
        assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
        assert m["text_retrieval_recall@5"] == pytest.approx(2 / 3)
        assert m["text_retrieval_ties"] == 0


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
def test_chunked_equals_clip_benchmark_reference(chunk):
    gen = torch.Generator().manual_seed(chunk)
    n_images, dim = 37, 16
    per_image = torch.randint(1, 5, (n_images,), generator=gen)
    # captions in shuffled order: nothing may assume they are grouped by image
    owner = torch.repeat_interleave(torch.arange(n_images), per_image)
    owner = owner[torch.randperm(len(owner), generator=gen)]
    image_emb = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
    # captions near their image so that recalls are neither 0 nor 1
    text_emb = F.normalize(image_emb[owner] + 0.6 * torch.randn(len(owner), dim, generator=gen),
                           dim=-1)
    want = reference_retrieval_metrics(image_emb, text_emb, owner, batch_size=5)
    for mode in MODES:  # no ties: every mode is CLIP_benchmark's number
        got = retrieval_metrics(image_emb, text_emb, owner, chunk=chunk, mode=mode)
        assert got["image_retrieval_ties"] == got["text_retrieval_ties"] == 0
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
        assert 0.0 < got["image_retrieval_recall@1"] < 1.0


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_clip_benchmark_mode_equals_its_code_with_ties(chunk):
    """Duplicated captions and images (exact ties): the default mode is CLIP_benchmark's code."""
    gen = torch.Generator().manual_seed(chunk)
    image_emb = F.normalize(torch.randn(20, 8, generator=gen), dim=-1)
    image_emb[10:] = image_emb[:10]                  # every image has a twin
    owner = torch.arange(60) % 20
    text_emb = F.normalize(image_emb[owner] + 0.5 * torch.randn(60, 8, generator=gen), dim=-1)
    text_emb[30:] = text_emb[:30]                    # every caption has a twin
    want = reference_retrieval_metrics(image_emb, text_emb, owner, batch_size=7)
    got = retrieval_metrics(image_emb, text_emb, owner, chunk=chunk)
    assert got["image_retrieval_ties"] > 0 and got["text_retrieval_ties"] > 0
    for key in want:  # the same hits; CLIP_benchmark averages in float32, vla in float64
        assert got[key] == pytest.approx(want[key], abs=1e-7), key
    low = retrieval_metrics(image_emb, text_emb, owner, mode="pessimistic")
    mid = retrieval_metrics(image_emb, text_emb, owner, mode="expected")
    assert all(low[k] <= mid[k] for k in want) and low["mean_recall"] < mid["mean_recall"]


def _full_matrix_counts(image_emb, text_emb, owner):
    """(g, e, p) per text and per image read off the whole texts × images matrix, by definition."""
    scores = text_emb @ image_emb.T
    n_texts, n_images = scores.shape
    own = torch.zeros_like(scores, dtype=torch.bool)
    own[torch.arange(n_texts), owner] = True
    pos = scores[torch.arange(n_texts), owner]
    t2i = ((scores > pos[:, None]).sum(1), ((scores == pos[:, None]) & ~own).sum(1), torch.ones(n_texts))
    i2t = [[], [], []]
    for i in range(n_images):
        column, mine = scores[:, i], own[:, i]
        if not mine.any():
            g, e, p = torch.iinfo(torch.int32).max, 0, 1
        else:
            best = column[mine].max()
            g, e, p = (column[~mine] > best).sum(), (column[~mine] == best).sum(), (column[mine] == best).sum()
        for acc, x in zip(i2t, (g, e, p)):
            acc.append(int(x))
    return t2i, tuple(torch.tensor(x) for x in i2t)


@pytest.mark.parametrize("chunk,block_elements", [(3, 10_000), (7, 10_000), (1000, 50), (1000, 200), (5, 1)])
def test_streamed_recalls_equal_the_whole_matrix_with_ties(chunk, block_elements):
    """The count-based modes, streamed in blocks that split the matrix unevenly (rows per block
    from `chunk` or from the `block_elements` budget), give the numbers read off the whole score
    matrix, on scores full of exact ties (small-integer embeddings: every dot product is exact, so
    twin images, twin captions and equal scores of different pairs tie in any summation order),
    captions in shuffled order and an image without captions."""
    gen = torch.Generator().manual_seed(block_elements)
    image_emb = torch.randint(-2, 3, (23, 6), generator=gen).float()
    image_emb[15:20] = image_emb[:5]                                      # twin images
    owner = torch.randint(0, 22, (61,), generator=gen)                   # image 22: no captions
    text_emb = image_emb[owner] + torch.randint(-1, 2, (61, 6), generator=gen).float()
    text_emb[40:50] = text_emb[:10]                                       # twin captions
    owner[40:50] = owner[:10]
    t2i, i2t = _full_matrix_counts(image_emb, text_emb, owner)
    assert (t2i[1] > 0).sum() > 5 and (i2t[1] > 0).sum() > 3             # ties are there
    for mode in ("pessimistic", "expected"):
        got = retrieval_metrics(image_emb, text_emb, owner, ks=(1, 2, 5, 10), chunk=chunk, mode=mode,
                                block_elements=block_elements)
        for k in (1, 2, 5, 10):
            assert got[f"image_retrieval_recall@{k}"] == pytest.approx(
                hit_probability(*t2i, k, mode).mean().item(), abs=1e-12), (mode, k)
            assert got[f"text_retrieval_recall@{k}"] == pytest.approx(
                hit_probability(*i2t, k, mode).mean().item(), abs=1e-12), (mode, k)
        assert got["image_retrieval_ties"] == int((t2i[1] > 0).sum())
        assert got["text_retrieval_ties"] == int((i2t[1] > 0).sum())
    # the per-query counts, block by block, are the whole matrix's
    for mine, want in ((text_to_image_counts(image_emb, text_emb, owner, chunk, block_elements), t2i),
                       (image_to_text_counts(image_emb, text_emb, owner, chunk, block_elements), i2t)):
        for a, b in zip(mine, want):
            assert torch.equal(a.long(), b.long())


def test_block_rows_keep_a_block_within_its_budget():
    """Rows per block: at most `chunk`, at most `block_elements` scores, never zero."""
    assert block_rows(5_000, chunk=1024, block_elements=1 << 24) == 1024
    assert block_rows(500_000, chunk=1024, block_elements=1 << 24) == 33
    assert block_rows(500_000, chunk=1024, block_elements=10) == 1
    assert block_rows(100_000) * 100_000 <= BLOCK_ELEMENTS


def test_retrieval_rejects_bad_owner_index():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0, 2])


MEMORY_SCRIPT = """
import resource, torch, torch.nn.functional as F
from vla.evaluate.retrieval import retrieval_metrics
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
images = F.normalize(torch.randn(5000, 64, generator=g), dim=-1)
texts = F.normalize(torch.randn(25000, 64, generator=g), dim=-1)
owner = torch.arange(25000) // 5
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = retrieval_metrics(images, texts, owner, mode="pessimistic")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024, m["mean_recall"])
"""


def test_chunked_retrieval_5000_images_25000_captions_stays_small():
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True,
                         check=True).stdout.split()
    extra_mb, mean_recall = float(out[0]), float(out[1])
    # the full score matrix alone would be 5000 × 25000 × 4 B = 500 MB; chunks of 1024 rows
    # hold ~100 MB of scores plus same-sized masks
    assert extra_mb < 1024, f"peak RSS grew by {extra_mb:.0f} MB"
    assert mean_recall < 0.01  # random embeddings retrieve at chance


# ---------------------------------------------------------------- zero-shot

def test_zeroshot_metrics_by_hand_with_ties_under_five_classes():
    logits = torch.tensor([
        [0.9, 0.1, 0.0],  # class 0 ✓
        [0.5, 0.5, 0.0],  # class 0, tied with 1 → wrong
        [0.2, 0.7, 0.1],  # class 1 ✓
        [0.3, 0.3, 0.3],  # class 2, three-way tie → wrong
        [0.0, 0.8, 0.1],  # class 1 ✓
    ])
    m = zeroshot_metrics(logits, [0, 0, 1, 2, 1], torch.eye(3), mode="pessimistic")
    assert m["acc1"] == pytest.approx(3 / 5)
    assert math.isnan(m["acc5"])  # fewer than 5 classes
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3)


def test_zeroshot_top5_with_a_tie_at_the_fifth_place():
    logits = torch.tensor([
        [6.0, 5, 4, 3, 2, 1],   # class 4 is 5th        → in top 5
        [6.0, 5, 4, 3, 2, 1],   # class 5 is 6th        → out
        [6.0, 5, 4, 3, 2, 2],   # class 4 ties class 5 for 5th → out (pessimistic)
        [1.0, 2, 3, 4, 5, 6],   # class 5 first          → top-1 ✓
    ])
    m = zeroshot_metrics(logits, [4, 5, 4, 5], torch.eye(6), mode="pessimistic")
    assert m["acc1"] == pytest.approx(1 / 4)
    assert m["acc5"] == pytest.approx(2 / 4)
    # classes 4 and 5 occur: recall 0/2 and 1/2; absent classes are not averaged in
    assert m["mean_per_class_recall"] == pytest.approx(0.25)


def test_zeroshot_classifier_normalises_each_template_then_the_mean():
    table = {"a cat": [1.0, 0.0], "the cat": [0.0, 1.0], "a dog": [1.0, 0.0], "the dog": [3.0, 0.0]}
    calls = []

    def encode_text(texts):
        calls.append(list(texts))
        return torch.tensor([table[t] for t in texts])

    w = zeroshot_classifier(encode_text, ["cat", "dog"], ["a {c}", "the {c}"])
    assert torch.allclose(w, torch.tensor([[2 ** -0.5, 2 ** -0.5], [1.0, 0.0]]))
    assert calls == [["a cat", "the cat"], ["a dog", "the dog"]]  # one batch per class, as CLIP_benchmark


# ---------------------------------------------------------------- captioning

def test_ptb_tokenize_lowercases_splits_clitics_and_drops_punctuation():
    """PTB tokens as pycocoevalcap keeps them: brackets become -lrb-/-rrb- (its punctuation list
    holds only the upper-case forms, so they stay), other punctuation is dropped."""
    assert ptb_tokenize("A man's T-shirt, (red) -- isn't it?") == \
        ["a", "man", "'s", "t-shirt", "-lrb-", "red", "-rrb-", "is", "n't", "it"]


def test_bleu4_by_hand():
    # identical → 1 (up to pycocoevalcap's 1e-9 guards)
    assert bleu(["A cat sits on the mat."], [["a cat sits on the mat"]]) == \
        pytest.approx(1, abs=1e-8)
    # all precisions 1, c = 4 < r = 6: BP = exp(1 − 6/4)
    assert bleu(["the cat sat on"], [["the cat sat on the mat"]]) == pytest.approx(math.exp(-0.5))
    # clipped precisions 4/6, 3/5, 2/4, 1/3; equal lengths
    assert bleu(["a b c d a b"], [["a b c d e f"]]) == pytest.approx((1 / 15) ** 0.25)
    # corpus level: counts are summed before the geometric mean; the second candidate's 4-gram
    # is in neither reference (its n-grams are clipped against the max over references) and
    # its closest reference length is 4 (of 4 and 9)
    got = bleu(["a b c d", "a b c d"], [["a b c d"], ["x b c d", "a b c e f g h i j"]])
    assert got == pytest.approx((8 / 8 * 6 / 6 * 4 / 4 * 1 / 2) ** 0.25, rel=1e-6)


def test_cider_d_by_hand():
    refs = [["a b c d e"], ["f g h i j"]]
    assert cider_d(["a b c d e", "f g h i j"], refs) == pytest.approx(10.0)
    # every n-gram has df = 1, so all weights are equal and cosines count shared n-grams:
    # 1-grams 4/(2·√5), 2-grams 3/(√3·2), 3-grams 2/(√2·√3), 4-grams 1/(1·√2);
    # bigram lengths 3 vs 4 → penalty exp(−1/72)
    first = 10 * math.exp(-1 / 72) * (2 / 5 ** 0.5 + 3 ** 0.5 / 2 + (2 / 3) ** 0.5 + 2 ** -0.5) / 4
    assert cider_d(["a b c d", "f g h i j"], refs) == pytest.approx((first + 10) / 2)
    # a word in every image's references has idf log 2 − log 2 = 0: it earns nothing
    assert cider_d(["the", "the"], [["the cat"], ["the dog"]]) == 0.0
    m = captioning_metrics(["a b c d e", "f g h i j"], refs)
    assert m.keys() == {"bleu4", "cider_d"}


# ---------------------------------------------------------------- eval sets and the runner

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def png(colour, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def sets(tmp_path):
    ret = tmp_path / "tiny_retrieval"
    (ret / "test").mkdir(parents=True)
    (ret / "info.json").write_text(json.dumps({"task": "retrieval", "name": "tiny"}))
    write_shard(ret / "test" / "0.tar", {
        f"{i:03d}": {"png": png(rgb), "txt": f"a {c} square\na very {c} picture\n".encode()}
        for i, (c, rgb) in enumerate(COLOURS.items())})

    zs = tmp_path / "tiny_zeroshot"  # no info.json: inferred from classnames.txt
    (zs / "classnames.txt").parent.mkdir()
    (zs / "classnames.txt").write_text("red\ngreen\nblue\n")
    (zs / "zeroshot_classification_templates.txt").write_text("a {c} square\na photo of {c}\n")
    write_shard(zs / "test" / "0.tar", {
        f"s{i}": {"webp": png(COLOURS[c]), "cls": str(label).encode()}
        for i, (c, label) in enumerate([("blue", 2), ("red", 0), ("red", 0), ("green", 1)])})

    reg = tmp_path / "tiny_regions"
    reg.mkdir()
    (reg / "info.json").write_text(json.dumps({"task": "regional_retrieval"}))
    canvas = Image.new("RGB", (20, 10), COLOURS["red"])
    canvas.paste(COLOURS["blue"], (10, 0, 20, 10))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    regions = [{"box": [0, 0, 10, 10], "caption": "red region"},
               {"box": [10, 2, 20, 8], "caption": "blue region"}]
    meta = json.dumps({"regions": regions}).encode()
    write_shard(reg / "test" / "0.tar", {"img": {"png": buf.getvalue(), "json": meta}})
    return tmp_path


class ColourModel:
    """A tiny exact dual encoder: images → their mean RGB; texts → the colour they name."""
    name = "colour"
    text_context_length = 3

    def encode_image(self, images):
        mean_rgb = [im.resize((1, 1)).getpixel((0, 0)) for im in images]
        return F.normalize(torch.tensor(mean_rgb, dtype=torch.float32), dim=-1)

    def encode_text(self, texts):
        return torch.tensor([[float(c in t) for c in COLOURS] for t in texts])

    def text_token_counts(self, texts):
        return [len(t.split()) for t in texts]


def test_load_retrieval_set(sets):
    es = load_eval_set(sets / "tiny_retrieval")
    assert (es.name, es.task, len(es.images)) == ("tiny", "retrieval", 3)
    assert es.captions[1] == ["a green square", "a very green picture"]
    assert es.blank_lines == {}
    assert es.images[2].getpixel((0, 0)) == COLOURS["blue"] and es.images[2].size == (8, 6)
    texts, owner = es.texts()
    assert owner == [0, 0, 1, 1, 2, 2] and texts[4] == "a blue square"


def test_load_zeroshot_set_infers_its_task(sets):
    es = load_eval_set(sets / "tiny_zeroshot")
    assert es.task == "zeroshot_classification"
    assert es.labels == [2, 0, 0, 1] and es.classnames == ["red", "green", "blue"]
    assert es.templates == ["a {c} square", "a photo of {c}"]


def test_load_regional_set_crops_each_region(sets):
    es = load_eval_set(sets / "tiny_regions")
    assert es.captions == [["red region"], ["blue region"]] and es.regions == ["img", "img"]
    crops = list(es.images)
    assert crops[0].size == (10, 10) and crops[0].getpixel((5, 5)) == COLOURS["red"]
    assert crops[1].size == (10, 6) and crops[1].getpixel((5, 3)) == COLOURS["blue"]


def test_missing_or_empty_eval_set_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        load_eval_set(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*no shards"):
        load_eval_set(tmp_path / "empty")
    bad = tmp_path / "bad"
    write_shard(bad / "test" / "0.tar", {"k": {"png": png((0, 0, 0))}})
    (bad / "info.json").write_text(json.dumps({"task": "captioning"}))
    with pytest.raises(UserError, match="k in .*no reference caption"):
        load_eval_set(bad)
    (bad / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(UserError, match="says 2 shards but .*1.tar does not exist"):
        load_eval_set(bad)


def test_eval_set_read_as_clip_benchmark_reads_it(tmp_path, caplog):
    """Blank key.txt lines are captions (`str.splitlines`), an empty key.txt an image without
    captions; dataset_type.txt sets the task; shards 0..n-1 in numeric order (10 after 9)."""
    root = tmp_path / "cb"
    for i in range(11):
        txt = {0: "first\n\nthird\n", 1: ""}.get(i, f"caption {i}")
        write_shard(root / "test" / f"{i}.tar", {f"k{i}": {"png": png((i, i, i)), "txt": txt.encode()}})
    (root / "test" / "nshards.txt").write_text("11\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    with caplog.at_level("WARNING"):
        es = load_eval_set(root)
    assert es.task == "retrieval"
    assert es.captions[:3] == [["first", "", "third"], [], ["caption 2"]]
    assert es.captions[10] == ["caption 10"] and es.images[10].getpixel((0, 0)) == (10, 10, 10)
    assert es.blank_lines == {"captions": 1} and "1 blank line(s) in its captions" in caplog.text
    (root / "test" / "nshards.txt").unlink()      # without nshards.txt: numeric order still
    assert load_eval_set(root).captions[10] == ["caption 10"]

    zs = tmp_path / "zs"
    write_shard(zs / "test" / "0.tar", {"a": {"png": png((0, 0, 0)), "cls": b"2"}})
    (zs / "dataset_type.txt").write_text("classification")
    (zs / "classnames.txt").write_text("red\n\nblue\n")   # a blank class keeps its index
    (zs / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    es = load_eval_set(zs)
    assert es.classnames == ["red", "", "blue"] and es.labels == [2]
    assert es.blank_lines == {"classnames": 1}


def test_evaluate_model_on_every_task(sets):
    paths = find_eval_sets(sets)
    assert [p.name for p in paths] == ["tiny_regions", "tiny_retrieval", "tiny_zeroshot"]
    results = evaluate_model(ColourModel(), [load_eval_set(p) for p in paths], batch_size=2)
    ret = results["tiny"]
    assert ret["mean_recall"] == 1.0 and ret["n_images"] == 3 and ret["n_texts"] == 6
    # "a red square" has 3 words (fits), "a very red picture" has 4 (truncated)
    assert ret["text_truncated_fraction"] == 0.5 and ret["context_length"] == 3
    assert results["tiny_regions"]["image_retrieval_recall@1"] == 1.0
    zs = results["tiny_zeroshot"]
    assert zs["acc1"] == 1.0 and zs["mean_per_class_recall"] == 1.0 and zs["n_classes"] == 3

    ex = retrieval_examples(ColourModel(), load_eval_set(sets / "tiny_retrieval"), n_queries=2)
    assert ex.targets == [0, 2] and ex.queries == ["a red square", "a blue square"]
    assert ex.scores.shape == (2, 3) and ex.scores.argmax(1).tolist() == [0, 2]
