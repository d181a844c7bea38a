"""Tests of the training loop: learning, metrics log, checkpoints, exact resume, artifacts.

Runs the real pretext methods (weak_label, byol) on a resnet18 at 32 px over a shard set
written here from generated images whose class is the size of a bright disc. Exact resume is
checked bitwise (torch.equal on every tensor) against an uninterrupted run, after stops by
``max_steps_this_run``, a lost checkpoint, a corrupt checkpoint and a SIGKILLed subprocess.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_builders import write_shard_set

from cytopretrain.curation import shards
from cytopretrain.learning import models, train
from cytopretrain.learning.checkpoints import CHECKPOINT_KEYS, read_metrics
from cytopretrain.learning.settings import check_settings

REPO = Path(__file__).resolve().parents[1]
THREADS = 1  # bitwise reproducibility needs the same thread count in every process
BASE = {
    "method": "weak_label",
    "backbone": "resnet18",
    "in_channels": 1,
    "image_size": 32,
    "batch_size": 8,
    "steps": 12,
    "lr": 2e-3,
    "warmup_steps": 2,
    "checkpoint_every": 3,
    "log_every": 2,
    "validate_every": 5,
    "seed": 1,
    "num_workers": 0,
    "progress": False,
}
CHILD = """
import json, sys, torch
torch.set_num_threads({threads})
from cytopretrain.learning import train
settings = json.loads(open(sys.argv[1]).read())
train.train(settings, sys.argv[2], sys.argv[3])
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def disc_images(per_class: int = 16, seed: int = 0) -> list[dict]:
    """40 x 44 grey images: noise plus a bright disc whose radius (4, 9, 14 px) is the class."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:40, :44]
    images = []
    for size, radius in (("small", 4), ("medium", 9), ("large", 14)):
        for number in range(per_class):
            cy, cx = 20 + rng.integers(-3, 4), 22 + rng.integers(-3, 4)
            disc = (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2
            image = np.clip(rng.normal(40, 12, disc.shape) + 150 * disc, 0, 255).astype(np.uint8)
            images.append({"idx": f"{size}-{number}", "label": size, "crops": [image[:, :, None]]})
    return images


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_shard_set(disc_images(), tmp_path_factory.mktemp("discs"), samples_per_shard=10)["dir"]


@pytest.fixture(scope="module")
def reference(shard_dir, tmp_path_factory):
    """An uninterrupted run of BASE."""
    out = tmp_path_factory.mktemp("reference")
    result = train.train(BASE, shard_dir, out)
    return {"out": out, "result": result}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(out: Path, reference_out: Path) -> None:
    for name in ("method.pt", "backbone.pt"):
        ours, theirs = tensors(out / name), tensors(reference_out / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key} differs"


def comparable_metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the timing field."""
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(out / "metrics.jsonl")]


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))


# --------------------------------------------------------------------------- learning, log


def test_loss_falls(shard_dir, tmp_path):
    settings = {**BASE, "steps": 30, "lr": 1e-3, "log_every": 1, "checkpoint_every": 30, "validate_every": 30}
    train.train(settings, shard_dir, tmp_path)
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 30
    # Single batches of 8 are noisy: compare the first 5 steps with the last 10.
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_metrics_log_steps_and_values(shard_dir, reference):
    records = read_metrics(reference["out"] / "metrics.jsonl")
    per_epoch = train_epoch_batches(shard_dir)
    assert [r["step"] for r in records] == [2, 4, 5, 6, 8, 10, 12]
    for record in records:
        trained = record["step"] % 2 == 0
        assert ("loss" in record) == trained and ("accuracy" in record) == trained
        assert ("val_loss" in record) == (record["step"] in (5, 10, 12))
        if trained:
            factor = train.lr_factor(record["step"] - 1, BASE["warmup_steps"], BASE["steps"])
            assert record["lr"] == pytest.approx(BASE["lr"] * factor)
            assert record["images_per_s"] > 0
        assert record["epoch"] == (record["step"] - 1) // per_epoch  # epoch of the step's batch


def train_epoch_batches(shard_dir: Path) -> int:
    """Batches per epoch with one rank: all train samples in full batches."""
    index = shards.load_index(shard_dir)
    return int(index.loc[index["split"] == "train", "n_samples"].sum()) // BASE["batch_size"]


def test_lr_schedule_shape():
    factors = [train.lr_factor(s, 4, 20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert factors[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert 0 < factors[-1] < 0.01


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_contents(shard_dir, reference):
    out = reference["out"]
    assert checkpoint_steps(out) == [9, 12]  # the newest two of 3, 6, 9, 12
    state = torch.load(out / "checkpoints" / "step-0000012.pt", weights_only=True)
    assert set(CHECKPOINT_KEYS) <= set(state)
    assert state["step"] == 12 and state["world_size"] == 1
    assert (state["epoch"], state["position"]) == divmod(12, train_epoch_batches(shard_dir))
    method = tensors(out / "method.pt")
    assert state["model"].keys() == method.keys()
    assert all(torch.equal(state["model"][k], method[k]) for k in method)
    assert len(state["rng"]) == 1
    assert set(state["rng"][0]) == {"torch", "cuda", "numpy", "python", "generator"}
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 12
    assert state["settings"] == check_settings(BASE)
    assert state["index_sha256"] == hashlib.sha256((shard_dir / "index.tsv").read_bytes()).hexdigest()
    earlier = torch.load(out / "checkpoints" / "step-0000009.pt", weights_only=True)
    assert not all(torch.equal(earlier["model"][k], state["model"][k]) for k in method)


def test_resume_after_stops_equals_uninterrupted(shard_dir, reference, tmp_path):
    # Stop after 4 steps (mid-epoch, between checkpoints), then after 3 more, then finish with
    # two DataLoader workers: batches must not depend on interruptions nor on num_workers.
    first = train.train(BASE, shard_dir, tmp_path, max_steps_this_run=4)
    assert not first["finished"] and first["step"] == 4
    assert checkpoint_steps(tmp_path) == [3, 4]
    assert not (tmp_path / "backbone.pt").exists()
    second = train.train(BASE, shard_dir, tmp_path, max_steps_this_run=3)
    assert second["step"] == 7
    # A lost checkpoint: the run continues from step 6 and logs steps 7.. again, once.
    (tmp_path / "checkpoints" / "step-0000007.pt").unlink()
    result = train.train({**BASE, "num_workers": 2}, shard_dir, tmp_path)
    assert result["finished"] and result["step"] == 12
    assert_same_weights(tmp_path, reference["out"])
    assert comparable_metrics(tmp_path) == comparable_metrics(reference["out"])
    again = train.train(BASE, shard_dir, tmp_path)  # finished: nothing left to do
    assert again["step"] == 12 and again["metrics"] == result["metrics"]
    assert_same_weights(tmp_path, reference["out"])


def test_sigkill_mid_run_then_resume(shard_dir, reference, tmp_path):
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(BASE))
    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(threads=THREADS), str(settings_file), str(shard_dir), str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step-*.pt")):
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (out / "backbone.pt").exists(), "the run finished before it was killed"
    result = train.train(BASE, shard_dir, out)
    assert result["finished"]
    assert_same_weights(out, reference["out"])
    assert comparable_metrics(out) == comparable_metrics(reference["out"])


def test_corrupt_newest_checkpoint_falls_back(shard_dir, reference, tmp_path):
    train.train(BASE, shard_dir, tmp_path, max_steps_this_run=6)
    newest = tmp_path / "checkpoints" / "step-0000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-0000006.pt"):
        result = train.train(BASE, shard_dir, tmp_path)
    assert result["finished"]
    assert (tmp_path / "checkpoints" / "step-0000006.pt.corrupt").exists()
    assert_same_weights(tmp_path, reference["out"])


def test_byol_resume_keeps_the_target_network(shard_dir, tmp_path):
    settings = {
        **BASE,
        "method": "byol",
        "steps": 4,
        "checkpoint_every": 2,
        "validate_every": 4,
        "method_options": {"projection_dim": 32, "hidden_dim": 64},
    }
    whole = train.train(settings, shard_dir, tmp_path / "whole")
    train.train(settings, shard_dir, tmp_path / "parts", max_steps_this_run=3)
    train.train(settings, shard_dir, tmp_path / "parts")
    assert whole["finished"]
    state = tensors(tmp_path / "whole" / "method.pt")
    assert any(key.startswith("target") for key in state)
    assert_same_weights(tmp_path / "parts", tmp_path / "whole")


# --------------------------------------------------------------------------- settings


def test_changed_settings_refuse_to_resume(shard_dir, tmp_path):
    train.train(BASE, shard_dir, tmp_path, max_steps_this_run=2)
    hint = r"; use another out_dir or resume=False"
    with pytest.raises(ValueError, match=r"other settings \(changed: \['lr'\]\)" + hint):
        train.train({**BASE, "lr": 1e-3}, shard_dir, tmp_path)
    # Logging and worker settings do not change the run: resuming with them is allowed.
    result = train.train({**BASE, "log_every": 3, "num_workers": 1}, shard_dir, tmp_path, max_steps_this_run=1)
    assert result["step"] == 3
    fresh = train.train(BASE, shard_dir, tmp_path, resume=False, max_steps_this_run=1)
    assert fresh["step"] == 1 and checkpoint_steps(tmp_path) == [1]


def test_stale_checkpoints_are_discarded_so_a_changed_run_starts_over(shard_dir, reference, tmp_path):
    train.train(BASE, shard_dir, tmp_path, max_steps_this_run=3)
    assert checkpoint_steps(tmp_path) == [3]
    # Same trajectory (a logging change): the checkpoint stays and training resumes from it.
    assert train.discard_stale_checkpoints(tmp_path, {**BASE, "log_every": 3}, shard_dir) is None
    assert checkpoint_steps(tmp_path) == [3]
    # Another rank count or other settings: checkpoints and metrics go, the reason is named.
    reason = train.discard_stale_checkpoints(tmp_path, BASE, shard_dir, world_size=2)
    assert "1 rank(s), this run has 2" in reason
    assert checkpoint_steps(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()
    train.train({**BASE, "lr": 1e-3}, shard_dir, tmp_path, max_steps_this_run=3)
    reason = train.discard_stale_checkpoints(tmp_path, BASE, shard_dir)
    assert "changed: ['lr']" in reason and checkpoint_steps(tmp_path) == []
    assert "resume=False" not in reason  # a library hint, meaningless to a workflow user
    # The run then trains from step 0 to the uninterrupted result.
    train.train(BASE, shard_dir, tmp_path)
    assert_same_weights(tmp_path, reference["out"])
    assert train.discard_stale_checkpoints(tmp_path / "empty", BASE, shard_dir) is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": None}, r"missing key\(s\) \['method'\]"),
        ({"learning_rate": 0.1}, r"unknown key\(s\) \['learning_rate'\]"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"optimizer": "lamb"}, "optimizer must be one of"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"steps": 2.5}, "steps must be a positive integer"),
    ],
)
def test_bad_settings_named(change, message, tmp_path):
    settings = {**BASE, **change}
    settings = {k: v for k, v in settings.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        train.train(settings, tmp_path, tmp_path / "out")


def test_batch_larger_than_split_is_refused(shard_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot fill one batch of 1000"):
        train.train({**BASE, "batch_size": 1000}, shard_dir, tmp_path)


# --------------------------------------------------------------------------- artifacts


def test_artifacts_and_model_card(shard_dir, reference):
    out = reference["out"]
    backbone_state = tensors(out / "backbone.pt")
    backbone = models.load_backbone(out / "backbone.pt", "resnet18", in_channels=1)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in backbone_state.items())
    method_state = tensors(out / "method.pt")
    assert {f"backbone.{k}" for k in backbone_state} < set(method_state)

    card = json.loads((out / "model_card.json").read_text())
    index = shards.load_index(shard_dir)
    counts = index.groupby("split")["n_samples"].sum()
    settings = check_settings(BASE)
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    assert card["backbone"] == "resnet18" and card["method"] == "weak_label"
    assert card["in_channels"] == 1 and card["image_size"] == 32 and card["feature_dim"] == 512
    assert card["data"] == {
        "shards_dir": str(Path(shard_dir).resolve()),
        "index_sha256": hashlib.sha256((shard_dir / "index.tsv").read_bytes()).hexdigest(),
        "n_train": int(counts["train"]),
        "n_validation": int(counts["validation"]),
        "n_classes": 3,
    }
    assert card["settings"] == settings
    assert card["config_hash"] == hashlib.sha256(canonical).hexdigest()
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert card["final_metrics"]["loss"] == last["loss"] and "val_accuracy" in card["final_metrics"]
    assert card["steps"] == 12 and card["wall_time_s"] > 0
    assert card["device"] == "cpu" and card["precision"] == "float32"
    assert card["torch_version"] == torch.__version__


def test_bf16_autocast_on_cpu(shard_dir, tmp_path):
    settings = {**BASE, "steps": 2, "precision": "bf16", "validate_every": 2}
    result = train.train(settings, shard_dir, tmp_path)
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["precision"] == "bfloat16"
    assert math.isfinite(result["metrics"]["loss"]) and math.isfinite(result["metrics"]["val_loss"])
    assert all(v.dtype != torch.bfloat16 for v in tensors(tmp_path / "backbone.pt").values())


def test_the_rule_log_says_resume_or_start_over_and_shows_progress_during_the_run(shard_dir, tmp_path, monkeypatch):
    """A user watching a long run's log saw nothing until the end: now it says whether the run
    resumes or starts over, and every log_every steps a line with images/s and an ETA is in the
    file while training goes on (read back at each checkpoint)."""
    import logging

    rule_log = tmp_path / "rule.log"
    handler = logging.FileHandler(rule_log, mode="w")  # as scripts/_workflow.setup_logging
    logger = logging.getLogger("cytopretrain")
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    seen_at_checkpoint = []
    save = train.Trainer.save_checkpoint

    def save_and_read(self):
        seen_at_checkpoint.append((self.progress.step, rule_log.read_text()))
        save(self)

    monkeypatch.setattr(train.Trainer, "save_checkpoint", save_and_read)
    try:
        out = tmp_path / "run"
        train.train(BASE, shard_dir, out, max_steps_this_run=4)
        train.train(BASE, shard_dir, out, max_steps_this_run=2)
        train.train(BASE, shard_dir, out, resume=False, max_steps_this_run=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
        handler.close()
    lines = rule_log.read_text().splitlines()
    assert sum("starting over: no checkpoint in" in line for line in lines) == 1
    assert any(f"resuming from step 4 (checkpoint {out / 'checkpoints' / 'step-0000004.pt'})" in line for line in lines)
    assert sum("starting over: resume=False" in line for line in lines) == 1
    progress = [line for line in lines if " images/s, ETA " in line]
    assert [line.split("step ")[1].split(" ")[0] for line in progress] == ["2/12", "4/12", "6/12"]
    step, text = seen_at_checkpoint[1]  # the checkpoint after step 4, before the run ended
    assert step == 4 and "step 4/12" in text and "step 2/12" in text
