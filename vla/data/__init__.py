"""Data: the sample format, WebDataset shards (img2dataset layout), JSONL manifests, the synthetic world."""

from vla.data.sample import Region, Sample

__all__ = ["Region", "Sample"]
