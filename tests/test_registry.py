"""The model registry on tiny real models: open_clip CLIPs, safe checkpoints, ultralytics, offline set-up."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vla.errors import UserError
from vla.models import registry
from vla.models.clip import load_clip, save_clip
from vla.models.encoder import DualEncoder
from vla.models.weights import load_state_dict, save_state_dict
from vla.offline import configure_offline

IMAGES = [Image.new("RGB", (40, 50), (220, 30, 30)), Image.new("RGB", (64, 64), (20, 40, 200))]
TEXTS = ["a red square", "a small blue circle to the left of a large green triangle on a white background"]


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return load_clip("vla-micro-clip")


def test_micro_clip_encodes_normalised(micro):
    assert isinstance(micro, DualEncoder)
    assert (micro.embed_dim, micro.image_size, micro.text_context_length) == (32, 32, 16)
    micro.model.train()
    img, txt = micro.encode_image(IMAGES), micro.encode_text(TEXTS)
    assert micro.model.training, "encoding must give the caller's training mode back"
    assert img.shape == txt.shape == (2, 32) and img.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(2))
    assert not torch.allclose(img[0], img[1]), "different images must embed differently"
    # "a red square": 3 BPE tokens + start + end; the long text runs past the 16-token context
    counts = micro.text_token_counts(TEXTS)
    assert counts[0] == 5 and counts[1] > 16


def test_save_clip_is_loaded_by_open_clip_itself(micro, tmp_path):
    import open_clip

    out = save_clip(micro, tmp_path / "clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in IMAGES]), normalize=True)
        txt = model.encode_text(tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(img, micro.encode_image(IMAGES), rtol=0, atol=0)
    torch.testing.assert_close(txt, micro.encode_text(TEXTS), rtol=0, atol=0)
    # vla reads the same layout back, by directory and by local-dir:, and can describe it as JSON
    for name in (str(out), f"local-dir:{out}"):
        again = load_clip(name)
        torch.testing.assert_close(again.encode_text(TEXTS), txt, rtol=0, atol=0)
    spec = json.loads(json.dumps(again.spec))
    assert spec["local_dir"] == str(out) and spec["model_cfg"]["embed_dim"] == 32
    assert spec["weights_file"].endswith("open_clip_model.safetensors")


def test_checkpoint_file_needs_its_architecture(micro, tmp_path):
    safe = tmp_path / "micro.safetensors"
    save_state_dict(micro.model.state_dict(), safe)
    loaded = load_clip(f"vla-micro-clip@{safe}")
    torch.testing.assert_close(loaded.encode_text(TEXTS), micro.encode_text(TEXTS), rtol=0, atol=0)
    # an open_clip training checkpoint (epoch_N.pt, saved from DDP) is weights-only and loads too
    ddp = {f"module.{k}": v for k, v in micro.model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": ddp}, tmp_path / "epoch_3.pt")
    from_pt = load_clip(f"vla-micro-clip@{tmp_path / 'epoch_3.pt'}")
    torch.testing.assert_close(from_pt.encode_image(IMAGES), micro.encode_image(IMAGES), rtol=0, atol=0)
    with pytest.raises(UserError, match="ARCH@"):
        load_clip(str(safe))
    with pytest.raises(UserError, match="does not fit architecture vla-tiny-clip"):
        load_clip(f"vla-tiny-clip@{safe}")


def test_official_weights_missing_offline_fail_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_clip("clip-vit-l")
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert "clip-vit-l (ViT-L-14, openai weights) is not available offline" in message
    assert "local-dir:" in message and "\n" not in message


class _Payload:
    """Unpickling this runs a command: what a hostile checkpoint does."""

    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, micro):
    payload = _Payload()
    payload.marker = tmp_path / "payload-ran"
    evil = tmp_path / "model.pt"
    torch.save({"weight": torch.ones(2), "hook": payload}, evil)
    with pytest.raises(UserError, match="model.pt contains pickled code, refused"):
        load_state_dict(evil)
    with pytest.raises(UserError, match="pickled code"):
        load_clip(f"vla-micro-clip@{evil}")
    assert not payload.marker.exists(), "the payload must never execute"


def test_plain_weights_round_trip(tmp_path):
    weights = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.int64)}
    weights["tied"] = weights["a"]  # shared storage: safetensors needs it cloned
    torch.save(weights, tmp_path / "w.pt")
    save_state_dict(weights, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == weights.keys()
        for key, tensor in weights.items():
            torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
    with pytest.raises(UserError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pt")


def test_detector_yaml_builds_detects_and_missing_pt_is_refused(tmp_path_factory, monkeypatch):
    from vla.models.dclip.yolo import Detection, detect, load_detector

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo")))
    threads = torch.get_num_threads()
    model = load_detector("yolov8n.yaml")
    assert model.task == "detect" and len(model.names) == 80
    found = detect(model, IMAGES, conf=0.0, max_det=3, imgsz=64)
    assert torch.get_num_threads() == threads, "ultralytics must not keep lowering torch's threads"
    assert len(found) == len(IMAGES) and all(len(d) <= 3 for d in found)
    for det in found[0]:
        assert isinstance(det, Detection) and 0 <= det.cls < 80
        x1, y1, x2, y2 = det.box
        assert 0 <= x1 <= x2 <= 40 and 0 <= y1 <= y2 <= 50  # in the original image's pixels
    start = time.perf_counter()
    for name in ("yolov8x", str(tmp_path_factory.mktemp("none") / "best.pt")):
        with pytest.raises(UserError, match="not on disk"):
            load_detector(name)
    assert time.perf_counter() - start < 1.0


def test_resolve_kind_and_describe(tmp_path):
    assert registry.resolve_kind("clip-vit-l") == "clip"
    assert registry.resolve_kind("qwen") == "embedder"
    assert registry.resolve_kind("yolov8x") == "detector"
    assert registry.resolve_kind("ViT-B-32:laion2b_s34b_b79k") == "clip"
    assert registry.resolve_kind("ViT-L-14@ft.safetensors") == "clip"
    assert registry.resolve_kind("BAAI/bge-small-en") == "embedder"
    assert registry.resolve_kind("runs/best.pt") == "detector"
    (tmp_path / "config.json").write_text("{}")
    assert registry.resolve_kind(str(tmp_path)) == "embedder"
    assert "ViT-L-14:openai" in registry.describe("clip-vit-l")
    with pytest.raises(UserError, match="unknown model name"):
        registry.resolve_kind("no-such-model")


def test_configure_offline(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLA_ONLINE", "YOLO_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    configure_offline()
    configure_offline()  # idempotent
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["YOLO_OFFLINE"] == "1"
    fonts = [tmp_path / "Ultralytics" / name for name in ("Arial.ttf", "Arial.Unicode.ttf")]
    assert all(f.stat().st_size > 100_000 for f in fonts)
    # a user with network opts out either way
    for var, value in (("HF_HUB_OFFLINE", "0"), ("VLA_ONLINE", "1")):
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("YOLO_OFFLINE", raising=False)
        monkeypatch.setenv(var, value)
        configure_offline()
        assert os.environ.get("HF_HUB_OFFLINE", "0") == "0" and "YOLO_OFFLINE" not in os.environ
        monkeypatch.delenv(var)
