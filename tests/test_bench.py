"""`python -m vla.bench` end to end on its smallest part: the JSON it writes is complete and sane."""

import json
import os
import subprocess
import sys

import pytest


def test_bench_retrieval_quick(tmp_path):
    env = {**os.environ, "VLA_BENCH_DIR": str(tmp_path)}  # leave the repo's bench/ alone
    subprocess.run([sys.executable, "-m", "vla.bench", "--only", "c", "--quick"], env=env, check=True,
                   capture_output=True)
    part = json.loads((tmp_path / "results.json").read_text())["parts"]["c"]
    details = part["details"]
    assert details["metrics_equal"]
    chunked, reference = details["chunked"]["metrics"], details["reference"]["metrics"]
    assert reference.keys() <= chunked.keys()  # vla adds the tie counts
    assert all(abs(chunked[k] - reference[k]) < 1e-6 for k in reference)
    assert 0 < chunked["mean_recall"] < 1  # the embeddings carry signal, so the check is not vacuous
    assert details["chunked"]["seconds"] > 0 and details["reference"]["seconds"] > 0
    assert [f["what"] for f in part["figures"]] == ["time", "peak memory", "peak memory at 1,000 × 5,000, whole process"]
    for side in ("chunked", "reference"):  # memory is the rise above the post-input baseline, both kept
        m = details[side]
        assert m["malloc_fixed"] and 0 < m["peak_mb"] < m["total_peak_mb"]
        assert m["total_peak_mb"] == pytest.approx(m["baseline_mb"] + m["peak_mb"])
    large = details["large"]  # vla alone at the larger size: the same metric keys, recalls in range
    assert (large["images"], large["captions"]) == (1000, 5000) and large["metrics"].keys() == chunked.keys()
    assert 0 < large["metrics"]["mean_recall"] < 1
    # --table reprints the last run's table from results.json without measuring again
    table = subprocess.run([sys.executable, "-m", "vla.bench", "--table"], env=env, check=True,
                           capture_output=True, text=True).stdout
    ratio = next(f["ratio"] for f in part["figures"] if f["what"] == "time")
    assert "peak memory (MB)" in table and f"{ratio:.2f}× speed-up" in table


def test_bench_mmgem_caption_quick(tmp_path):
    """Part f: captions/s with generate + KV cache vs no cache; both must write the same captions."""
    env = {**os.environ, "VLA_BENCH_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "vla.bench", "--only", "f", "--quick"], env=env, check=True,
                   capture_output=True)
    part = json.loads((tmp_path / "results.json").read_text())["parts"]["f"]
    details = part["details"]
    assert details["captions_equal"] and details["images"] == 4
    assert 0 < details["tokens_per_caption"] <= details["max_new_tokens"]
    (figure,) = part["figures"]
    assert figure["what"] == "captioning throughput" and figure["unit"] == "captions/s"
    assert figure["vla"] > 0 and figure["baseline"] > 0
    assert abs(figure["ratio"] - figure["vla"] / figure["baseline"]) < 1e-9  # speed-up = captions/s ratio


def test_bench_dclip_quick(tmp_path):
    """Part e at its smallest: both DCLIP comparisons ran, and each asserted its two ways agree."""
    env = {**os.environ, "VLA_BENCH_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1",
           "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
    r = subprocess.run([sys.executable, "-m", "vla.bench", "--only", "e", "--quick"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    part = json.loads((tmp_path / "results.json").read_text())["parts"]["e"]
    assert [f["what"] for f in part["figures"]] == ["precompute-regions", "train-teacher epoch",
                                                    "train-teacher epoch, text tower per batch vs cached states"]
    regions, teacher = part["details"]["precompute_regions"], part["details"]["train_teacher"]
    assert regions["images"] == 32 and regions["crops"] > regions["images"]  # crops were encoded
    assert regions["max_embedding_difference"] < 1e-3  # the same regions either way
    assert all(s > 0 for s in regions["batched_s"] + regions["per_image_per_crop_s"])
    assert teacher["table_epoch_s"][0] > 0 and teacher["reencoded_epoch_s"][0] > 0
    assert teacher["per_batch_text_epoch_s"][0] > 0 and teacher["cached_text_epoch_s"][0] > 0
    # at most 14 real tokens and the pooled vector, D = 128, float16 (not 16 padded positions)
    assert 0 < teacher["text_cache_bytes_per_caption"] <= 15 * 128 * 2
    assert all(f["vla"] > 0 and f["baseline"] > 0 for f in part["figures"])


def test_bench_joint_step_quick(tmp_path):
    # part g at its smallest: both ways train, give the same loss, and the figure is their ratio
    env = {**os.environ, "VLA_BENCH_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "vla.bench", "--only", "g", "--quick"], env=env, check=True,
                   capture_output=True)
    part = json.loads((tmp_path / "results.json").read_text())["parts"]["g"]
    details = part["details"]
    assert details["quick"] and details["same_loss"] and details["loss_one_call"] > 0
    assert details["lm_calls_per_step"] == {"shared": 1, "separate": 2}
    assert details["caption_tokens_max"] > details["caption_tokens_mean"] > 0  # long captions are in the batch
    (figure,) = part["figures"]
    assert figure["what"] == "joint-train step" and figure["unit"] == "samples/s"
    assert figure["vla"] == max(details["shared_samples_per_s"]) > 0
    assert figure["baseline"] == max(details["separate_samples_per_s"]) > 0
    assert abs(figure["ratio"] - figure["vla"] / figure["baseline"]) < 1e-9


def test_bench_gemm_runs_every_product_both_ways():
    # `python -m vla.bench.gemm`: each of the step's 24 products timed both ways, after its own
    # check that oneDNN's result equals torch's (an assertion inside: a mismatch exits non-zero)
    pytest.importorskip("torch")
    from vla.models.onednn_linear import available

    if not available():
        pytest.skip("this torch has no oneDNN")
    out = subprocess.run([sys.executable, "-m", "vla.bench.gemm", "--repeats", "1"], check=True,
                         capture_output=True, text=True).stdout
    rows = [ln for ln in out.splitlines() if ln.startswith(("| image", "| text"))]
    assert len(rows) == 2 * 4 * 3
    assert all(float(ln.split("|")[5]) > 0 and float(ln.split("|")[6]) > 0 for ln in rows)
    assert "one step's linears (both towers, every layer): blas" in out


@pytest.mark.slow
def test_bench_loader_quick(tmp_path):
    """Part h: the loader reads every image of both worlds in all three ways, and its JSON holds
    the two figures (draft vs full decode, 256 px draft vs a 64 px source) with positive rates."""
    env = {**os.environ, "VLA_BENCH_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "vla.bench", "--only", "h", "--quick"], env=env, check=True,
                   capture_output=True)
    part = json.loads((tmp_path / "results.json").read_text())["parts"]["h"]
    details = part["details"]
    assert details["images_seen"] == {"draft": 128, "full": 128, "stored64": 128}
    assert {f["what"] for f in part["figures"]} == {"loader, draft vs full decode",
                                                    "loader, 256 px draft vs 64 px source"}
    assert all(f["vla"] > 0 and f["baseline"] > 0 for f in part["figures"])

def test_bench_loader_dtype_quick(tmp_path):
    """Part u at its smallest: the same loader with uint8 and with fp32 batches, both measured;
    the uint8 batches are a quarter of the bytes."""
    env = {**os.environ, "VLA_BENCH_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "vla.bench", "--only", "u", "--quick"], env=env, check=True,
                   capture_output=True, timeout=600)
    part = json.loads((tmp_path / "results.json").read_text())["parts"]["u"]
    rate, size = part["figures"]
    assert rate["unit"] == "images/s" and rate["vla"] > 0 and rate["baseline"] > 0
    assert size["ratio"] == 0.25 and size["met"]
    assert part["details"]["uint8_images_per_s"] and part["details"]["fp32_images_per_s"]


MEMORY_HELPER = """
import json, numpy as np, torch
from vla.bench.memory import peak_rss
held = np.ones(300 * 2**20 // 8)           # 300 MB touched, then freed: an earlier peak
del held
def churn():                               # tensors of 4-30 MB made and dropped one after another
    for i in range(60):
        torch.ones((4 + i % 27) * 2**18)
one = peak_rss(lambda: np.ones(200 * 2**20 // 8).sum())
two = peak_rss(lambda: np.ones(50 * 2**20 // 8).sum())
three = peak_rss(churn)
print(json.dumps([one, two, three]))
"""


def test_peak_rss_measures_the_call_alone():
    """`vla.bench.memory.peak_rss`: the rise of the RSS during the call alone (an earlier, larger
    peak of the process is not counted), with glibc's mmap threshold fixed so that tensors made
    and dropped one after another count once, not as the heap happened to keep them."""
    out = subprocess.run([sys.executable, "-c", MEMORY_HELPER], check=True, capture_output=True, text=True)
    one, two, three = json.loads(out.stdout.strip().splitlines()[-1])
    assert one["malloc_fixed"] and one["baseline_mb"] > 0 and one["seconds"] > 0
    assert 195 < one["peak_mb"] < 230, one
    assert 45 < two["peak_mb"] < 80, two                   # not the 300 MB or 200 MB peaks before it
    assert two["total_peak_mb"] == pytest.approx(two["baseline_mb"] + two["peak_mb"])
    assert three["peak_mb"] < 45, three                    # one 30 MB tensor at a time
