"""Evaluation: retrieval (short, long, regional), zero-shot classification and captioning metrics
as CLIP_benchmark defines them (its own tie ranking by default; `MODES`), eval sets in its
WebDataset layout, the runner, the report, and merging several runs into one table."""

from vla.evaluate.captioning import bleu, captioning_metrics, cider_d, ptb_tokenize
from vla.evaluate.evalsets import EvalSet, find_eval_sets, load_eval_set
from vla.evaluate.merge import merge, merge_results
from vla.evaluate.report import write_clip_benchmark_results, write_report, write_retrieval_grid
from vla.evaluate.retrieval import MODES, reference_retrieval_metrics, retrieval_metrics
from vla.evaluate.run import RetrievalExamples, evaluate_model, evaluate_set, retrieval_examples
from vla.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics

__all__ = [
    "MODES", "EvalSet", "merge", "merge_results", "write_clip_benchmark_results", "RetrievalExamples", "bleu", "captioning_metrics", "cider_d", "evaluate_model",
    "evaluate_set", "find_eval_sets", "load_eval_set", "ptb_tokenize",
    "reference_retrieval_metrics", "retrieval_examples", "retrieval_metrics", "write_report",
    "write_retrieval_grid", "zeroshot_classifier", "zeroshot_metrics",
]
