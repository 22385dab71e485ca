"""Evaluation sets built in memory from a data split (e.g. a synth artifact's `val/`), so that a
training stage can measure itself on held-out data that no choice is ever made on the test split
with: retrieval (the short captions, each kept only where no other image of the split has it, as
the synthetic world's test set does) and zero-shot classification (the samples' labels, with the
class names and templates of a zero-shot set beside it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from vla.errors import UserError
from vla.evaluate.evalsets import EvalSet


def split_eval_sets(split: Path, zeroshot_set: Path | None, max_images: int = 1000,
                    prefix: str = "val") -> list[EvalSet]:
    """[`{prefix}_retrieval`, `{prefix}_zeroshot`] from the first `max_images` samples of `split`
    (the zero-shot set only when `zeroshot_set` is given and the samples carry labels)."""
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data
    from vla.evaluate.evalsets import load_eval_set

    samples = []
    for s in resolve_data(split).iter_samples(SkipCounter()):
        samples.append(s)
        if len(samples) == max_images:
            break
    if len(samples) < 2:
        raise UserError(f"{split} has {len(samples)} usable samples; per-epoch evaluation needs at least 2")
    owners = Counter(c for s in samples for c in set(s.captions))
    kept = [(s, [c for c in s.captions if owners[c] == 1]) for s in samples]
    kept = [(s, caps) for s, caps in kept if caps]
    sets = [EvalSet(name=f"{prefix}_retrieval", task="retrieval", path=Path(split),
                    images=[s.image.convert("RGB") for s, _ in kept], captions=[caps for _, caps in kept])]
    if zeroshot_set is not None and all(s.label is not None for s in samples):
        ref = load_eval_set(zeroshot_set)
        sets.append(EvalSet(name=f"{prefix}_zeroshot", task="zeroshot_classification", path=Path(split),
                            images=[s.image.convert("RGB") for s in samples], labels=[int(s.label) for s in samples],
                            classnames=ref.classnames, templates=ref.templates))
    return sets
