"""`make gpu-check`'s recipes check: one step of every real recipe at its real per-GPU batch on
randomly initialised real architectures (ViT-L/14 and ViT-B/16 from open_clip's configs,
Qwen3-Embedding-0.6B's and TinyLlama-1.1B's configs, YOLOv8x's yaml): samples/s and peak memory
per GPU; tiny sizes on the CPU."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vla.gpucheck import Sizes

from vla.gpucheck.steps import aligner, contrast_step, synthetic_batches

#: the real architectures' configs (random init: no weights are downloaded), from their model cards'
#: config.json; the CPU self-test uses the tiny sizes beside them
QWEN3_EMBEDDING_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, vocab_size=151669, max_position_embeddings=32768,
                            rope_theta=1e6, tie_word_embeddings=True)
TINY_QWEN3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, vocab_size=512, max_position_embeddings=128)
TINYLLAMA_1_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


@dataclass
class RecipeRow:
    """One real recipe's step: what it builds at real (cuda) and tiny (cpu) sizes."""

    name: str
    recipe: str          # the recipe file it stands for
    batch: tuple[int, int]  # per-GPU batch: (real, tiny)


RECIPE_ROWS = [
    RecipeRow("ProCLIP distill: Qwen3-Embedding-0.6B encode (bf16, 512 tokens)", "recipes/gpu/proclip/distill.yaml", (256, 2)),
    RecipeRow("ProCLIP distill: adapter step", "recipes/gpu/proclip/distill.yaml", (128, 4)),
    RecipeRow("ProCLIP contrast-tune: ViT-L/14 + adapter + EMA teacher", "recipes/gpu/proclip/contrast-tune.yaml", (512, 4)),
    RecipeRow("LLM2CLIP: ViT-L/14 + adapter", "recipes/gpu/proclip/llm2clip.yaml", (512, 4)),
    RecipeRow("DCLIP precompute-regions: YOLOv8x detect (640 px)", "recipes/gpu/dclip/precompute-regions.yaml", (32, 2)),
    RecipeRow("DCLIP train-teacher: meta-teacher (512-d, 8 heads)", "recipes/gpu/dclip/train-teacher.yaml", (256, 4)),
    RecipeRow("DCLIP train-student: ViT-B/16", "recipes/gpu/dclip/train-student.yaml", (256, 4)),
    RecipeRow("MM-GEM joint-train: ViT-L/14 + TinyLlama-1.1B (50 tokens, LAMB)", "recipes/gpu/mmgem/joint-train.yaml", (256, 4)),
]


def _train_rate(model, step, batch: dict, n: int, device: str, precision: str, **cfg) -> float:
    """samples/s of the training loop on one fixed batch (its first step left out)."""
    from vla.train import TrainConfig, train

    cfg = TrainConfig(steps=3, warmup_steps=0, lr=1e-5, precision=precision, device=device,
                      checkpoint_every=10**6, log_every=10**6, **cfg)

    def batches(_start: int):
        while True:
            yield batch

    with tempfile.TemporaryDirectory(prefix="vla-gpucheck-step-") as out:
        return train(cfg, model, step, batches, Path(out), samples_per_batch=lambda b: n).samples_per_s


def _infer_rate(fn, n: int, device: str, steps: int = 3) -> float:
    import torch

    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * n / (time.perf_counter() - start)


def _recipe_step(row: RecipeRow, s: Sizes) -> float:
    """Build `row`'s model at random init and run its step; samples/s."""
    import torch
    import torch.nn.functional as F

    real = s.device == "cuda"
    b = row.batch[0 if real else 1]
    dev, prec = s.device, s.precision
    g = torch.Generator().manual_seed(0)
    name = row.recipe.split("/")[-2] + "/" + row.name.split(":")[1].strip()
    if "encode" in row.name:
        from transformers import Qwen3Config, Qwen3Model

        cfg = Qwen3Config(**(QWEN3_EMBEDDING_0_6B if real else TINY_QWEN3))
        model = Qwen3Model(cfg).to(dev, torch.bfloat16 if real else torch.float32).eval()
        ids = torch.randint(cfg.vocab_size, (b, 512 if real else 16), generator=g).to(dev)

        @torch.no_grad()
        def encode():
            return model(input_ids=ids).last_hidden_state[:, -1]

        return _infer_rate(encode, b, dev)
    if "adapter step" in row.name:
        from vla.losses import distill_loss
        from vla.models.proclip.adapter import Adapter, AdapterConfig

        d_in, d_out = (1024, 768) if real else (32, 16)
        adapter = Adapter.from_config(AdapterConfig.proclip(d_in, d_out))
        batch = {k: torch.randn(b, d, generator=g) for k, d in (("phi", d_in), ("phi2", d_in), ("u", d_out), ("u2", d_out))}

        def step(m, bt):
            return distill_loss(F.normalize(m(bt["phi"]), dim=-1), F.normalize(bt["u"], dim=-1),
                                F.normalize(m(bt["phi2"]), dim=-1), F.normalize(bt["u2"], dim=-1))

        return _train_rate(adapter, step, batch, b, dev, prec)
    if "ViT-L/14 + adapter" in row.name:
        model, size = aligner("ViT-L-14" if real else "vla-micro-clip", s.embed_dim, teacher="EMA" in row.name)
        batch = next(synthetic_batches(b, size, s.embed_dim, "cpu")(0))
        return _train_rate(model, contrast_step("EMA" in row.name), batch, b, dev, prec, grad_checkpointing=True)
    if "YOLOv8x" in row.name:
        from ultralytics import YOLO

        net = YOLO("yolov8x.yaml" if real else "yolov8n.yaml").model.to(dev).eval()
        px = 640 if real else 64
        images = torch.rand(b, 3, px, px, generator=g).to(dev)

        @torch.no_grad()
        def detect():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=real):
                return net(images)

        return _infer_rate(detect, b, dev)
    if "meta-teacher" in row.name:
        from vla.losses import dclip_teacher_loss
        from vla.models.dclip import MetaTeacher, TeacherConfig

        d, heads, k, length = (512, 8, 11, 77) if real else (32, 2, 3, 8)
        teacher = MetaTeacher(TeacherConfig(dim=d, heads=heads)).train()
        batch = {"tokens": torch.randn(b, length, d, generator=g), "token_mask": torch.ones(b, length, dtype=torch.bool),
                 "text": torch.randn(b, d, generator=g), "regions": torch.randn(b, k, d, generator=g),
                 "region_mask": torch.ones(b, k, dtype=torch.bool), "conf": torch.rand(b, k, generator=g),
                 "area": torch.rand(b, k, generator=g)}

        def step(m, bt):
            emb = m(bt["tokens"], bt["token_mask"], bt["text"], bt["regions"], bt["region_mask"], bt["conf"], bt["area"])
            return {"loss": dclip_teacher_loss(emb, bt["text"])}

        return _train_rate(teacher, step, batch, b, dev, prec)
    if "ViT-B/16" in row.name:
        from vla.losses import dclip_student_loss
        from vla.models.clip import load_clip

        clip = load_clip("ViT-B-16" if real else "vla-micro-clip")
        visual = clip.model.visual.train()
        size = clip.image_size if isinstance(clip.image_size, int) else clip.image_size[0]
        batch = {"image": torch.randn(b, 3, size, size, generator=g),
                 "teacher": torch.randn(b, clip.embed_dim, generator=g), "text": torch.randn(b, clip.embed_dim, generator=g)}

        def step(m, bt):
            return dclip_student_loss(F.normalize(m(bt["image"]), dim=-1), bt["teacher"], F.normalize(bt["text"], dim=-1))

        return _train_rate(visual, step, batch, b, dev, prec)
    if "MM-GEM" in row.name:
        from vla.losses import ClipLoss
        from vla.models.mmgem.causal_lm import TinyLlamaSize
        from vla.models.mmgem import MMGEMConfig, build_mmgem
        from vla.models.mmgem.objective import MMGEMTrainer

        words = ["a", "red", "small", "dog", "runs", "on", "the", "green", "grass", "near", "two", "blue", "cars"]
        captions = [" ".join(words[(i * 7 + j) % len(words)] for j in range(60 if real else 8)) for i in range(b)]
        size = TinyLlamaSize(**{**TINYLLAMA_1_1B, "vocab_size": 512}) if real else TinyLlamaSize()
        model = build_mmgem("ViT-L-14" if real else "vla-micro-clip", None, captions,
                            MMGEMConfig(prefix_length=1, max_text_tokens=50 if real else 16), lm_size=size)
        if real:  # TinyLlama's vocabulary, for the logits' real size (the tokenizer uses the first rows)
            model.lm.resize_token_embeddings(TINYLLAMA_1_1B["vocab_size"])
        trainer = MMGEMTrainer(model, "joint", ClipLoss()).train()
        px = model.tower.image_size
        px = px if isinstance(px, int) else px[0]
        batch = {"pixels": torch.randn(b, 3, px, px, generator=g), "captions": captions}

        def step(m, bt):
            return m(bt["pixels"], bt["captions"])

        return _train_rate(trainer, step, batch, b, dev, prec, optimizer="lamb")
    raise ValueError(f"no step for {name}")


def check_recipes(s: Sizes, work: Path) -> tuple[str, dict]:
    """One step of every real recipe at its real per-GPU batch on randomly initialised real
    architectures: samples/s and peak GPU memory per row; an out-of-memory fails the row."""
    import gc

    import torch

    rows, failed = [], []
    for row in RECIPE_ROWS:
        if s.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        entry = {"row": row.name, "recipe": row.recipe, "batch_per_gpu": row.batch[0 if s.device == "cuda" else 1]}
        try:
            entry["samples_per_s"] = round(_recipe_step(row, s), 1)
        except torch.OutOfMemoryError as err:
            entry["error"] = f"out of memory: {str(err).splitlines()[0][:200]}"
        except Exception as err:  # noqa: BLE001 - a row's failure is reported in the table
            entry["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        if s.device == "cuda":
            entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        gc.collect()
        rows.append(entry)
        if "error" in entry:
            failed.append(f"{row.name}: {entry['error']}")
    print("\n| recipe step | per-GPU batch | samples/s | peak GiB |\n|---|---:|---:|---:|")
    for e in rows:
        print(f"| {e['row']} | {e['batch_per_gpu']} | {e.get('samples_per_s', 'FAILED')} | {e.get('peak_gib', '-')} |")
    if failed:
        raise RuntimeError("; ".join(failed))
    return f"{len(rows)} recipe steps at their per-GPU batch on {s.device}", {"rows": rows}
