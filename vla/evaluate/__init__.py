"""Evaluation: retrieval (short, long, regional), zero-shot classification and captioning metrics
as CLIP_benchmark defines them, eval sets in its WebDataset layout, the runner and the report."""

from vla.evaluate.captioning import bleu, captioning_metrics, cider_d, ptb_tokenize
from vla.evaluate.evalsets import EvalSet, find_eval_sets, load_eval_set
from vla.evaluate.report import write_report, write_retrieval_grid
from vla.evaluate.retrieval import reference_retrieval_metrics, retrieval_metrics
from vla.evaluate.run import RetrievalExamples, evaluate_model, evaluate_set, retrieval_examples
from vla.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics

__all__ = [
    "EvalSet", "RetrievalExamples", "bleu", "captioning_metrics", "cider_d", "evaluate_model",
    "evaluate_set", "find_eval_sets", "load_eval_set", "ptb_tokenize",
    "reference_retrieval_metrics", "retrieval_examples", "retrieval_metrics", "write_report",
    "write_retrieval_grid", "zeroshot_classifier", "zeroshot_metrics",
]
