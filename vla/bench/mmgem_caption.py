"""Part f: MM-GEM captioning throughput — batched `generate` with a KV cache vs decoding without one.

The model is the embedded default's MM-GEM at its `make mmgem` size (`recipes/embedded/
joint-train.yaml`: the tiny CLIP's image tower, the tiny Llama with a byte-level BPE trained on
the synthetic world's captions), with seeded random weights: throughput does not depend on what
the weights learnt, only on how many tokens are written, and an untrained LM rarely writes end of
text, so both ways write every caption to `max_new_tokens` — the same work, compared fairly.
Both ways decode the same batches of images greedily from the same inputs `[V_in, [CAP]]`:

    vla        `MMGEM.generate_ids`: transformers' `generate`, KV cache, the batch at once
    baseline   `greedy_decode_without_cache`: the same batch, the LM re-run over the whole
               sequence for every new token (no cache)

The captions must be identical token for token (asserted), so the ratio is the cache's and
`generate`'s gain alone. Both ways decode one small batch untimed first (lazy initialisation);
then rounds alternate A B B A (`alternate`) and each way keeps its best round.

At this size (2 layers × 64, ≤ 34 positions) the LM's matrix products are so small that
`generate`'s per-step bookkeeping weighs as much as the recomputation it saves, so the goal is a
modest 1.5×; the gain grows with the sequence length and the LM (TinyLlama: 22 layers × 2048).
"""

from __future__ import annotations

import random
import time

from vla.bench import Figure, Part, alternate

SEED = 0
FULL = {"images": 256, "batch": 64, "max_new_tokens": 32, "rounds": 2}
QUICK = {"images": 4, "batch": 2, "max_new_tokens": 4, "rounds": 1}


def build_model():
    """The embedded MM-GEM at make mmgem's size, seeded; its tokenizer trained on world captions."""
    import torch

    from vla.data.synth import SynthConfig, sample_scene
    from vla.data.synth_text import long_caption, short_captions
    from vla.models.mmgem.causal_lm import TinyLlamaSize
    from vla.models.mmgem import MMGEMConfig, build_mmgem

    rng = random.Random(SEED)
    scenes = [sample_scene(rng, SynthConfig()) for _ in range(300)]
    captions = [c for s in scenes for c in short_captions(s, rng, 2)] + [long_caption(s, rng) for s in scenes]
    torch.manual_seed(SEED)
    model = build_mmgem("vla-tiny-clip", None, captions, MMGEMConfig(prefix_length=1, max_text_tokens=128),
                        seed=SEED, lm_size=TinyLlamaSize())
    return model.eval()


def _pixels(model, n: int):
    import torch

    g = torch.Generator().manual_seed(SEED)
    size = model.tower.image_size
    size = size if isinstance(size, int) else size[0]
    return torch.rand(n, 3, size, size, generator=g)


def decode_all(model, pixels, batch: int, max_new_tokens: int, cached: bool) -> tuple[list[list[int]], float]:
    """Every image's caption ids, `batch` images at a time, and the seconds it took."""
    import torch

    from vla.models.mmgem import greedy_decode_without_cache

    ids: list[list[int]] = []
    start = time.perf_counter()
    for s in range(0, len(pixels), batch):
        chunk = pixels[s:s + batch]
        if cached:
            ids += model.generate_ids(chunk, max_new_tokens=max_new_tokens)
        else:
            with torch.no_grad():
                ids += greedy_decode_without_cache(model, model.caption_inputs(chunk), max_new_tokens)
    return ids, time.perf_counter() - start


def run(quick: bool) -> Part:
    import torch

    size = QUICK if quick else FULL
    model = build_model()
    pixels = _pixels(model, size["images"])
    args = (size["batch"], size["max_new_tokens"])
    for cached in (True, False):  # warm-up, untimed
        decode_all(model, pixels[:2], 2, 2, cached)
    cached_runs, naive_runs = alternate(lambda: decode_all(model, pixels, *args, cached=True),
                                        lambda: decode_all(model, pixels, *args, cached=False), size["rounds"])
    same = all(c[0] == n[0] for c in cached_runs for n in naive_runs)
    if not same:
        raise AssertionError("generate with a KV cache and decoding without one wrote different captions")
    n = size["images"]
    cached_s, naive_s = min(r[1] for r in cached_runs), min(r[1] for r in naive_runs)
    tokens = sum(len(row) for row in cached_runs[0][0])
    part = Part("f", f"MM-GEM captioning, {n} images × ≤ {size['max_new_tokens']} tokens, "
                     f"batches of {size['batch']} (embedded tiny Llama)",
                "the same batches decoded token by token without a KV cache")
    part.figures = [Figure("captioning throughput", "captions/s", n / cached_s, n / naive_s,
                           naive_s / cached_s, "speed-up", 1.5)]
    part.details = {**size, "captions_equal": same, "tokens_written": tokens,
                    "tokens_per_caption": tokens / n, "threads": torch.get_num_threads(),
                    "lm": {"layers": model.lm.config.num_hidden_layers, "hidden": model.lm.config.hidden_size,
                           "vocab": len(model.tokenizer)},
                    "prefix_tokens": model.config.prefix_length + 1 + (model.bos_id is not None),
                    "cached": {"seconds": [r[1] for r in cached_runs]},
                    "without_cache": {"seconds": [r[1] for r in naive_runs]}}
    return part
