"""Benchmark configurations (``--config``): the recipe is reproducible and gives NMS real work, the cache
is reused only while its record matches, and the benchmark refuses what it cannot run. No R50 export
here (minutes): ``make benchmark-r50`` does that; these use a small layout and the demo bundle."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from retinaedge.runtime.errors import ConfigError
from support.blocked import run_blocked
from support.paths import DEMO

pytestmark = pytest.mark.export


def small() -> object:
    from retinaedge.bench.models import CONFIGS

    return dataclasses.replace(CONFIGS["r50-fpn-512"], architecture="resnet18_fpn", input_size=128)


def test_the_random_weights_are_seeded_and_biased_so_most_scores_pass_the_threshold() -> None:
    import torch
    from retinaedge.bench.models import random_model
    from retinaedge.export.dense import make_dense_module
    from retinaedge.export.torchload import state_dict_sha256

    first, again = random_model(small()), random_model(small())  # unseeded, two builds would differ
    assert state_dict_sha256(first) == state_dict_sha256(again)
    with torch.no_grad():
        logits, _ = make_dense_module(first, 1)(torch.full((1, 1, 128, 128), 0.5))
    above = float((torch.sigmoid(logits) > 0.05).float().mean())
    assert above > 0.9, f"only {above:.0%} of (anchor, class) scores above 0.05"


def test_the_cache_is_reused_only_while_its_record_matches(tmp_path: Path) -> None:
    from retinaedge.bench.models import (
        BUNDLE_DIR,
        CONFIG_FILE,
        cached_bundle,
        config,
        ensure_bundle,
        wanted_config,
    )

    name = "r50-fpn-512"
    folder = tmp_path / name
    shutil.copytree(DEMO, folder / BUNDLE_DIR)
    wanted = wanted_config(name, config(name), None)
    assert (
        wanted["config"]["architecture"] == "retinanet_resnet50_fpn" and wanted["config"]["input_size"] == 512
    )
    assert cached_bundle(folder, wanted) is None  # no record yet
    (folder / CONFIG_FILE).write_text(json.dumps(wanted))
    # A matching record and a bundle that loads: reused as it is, nothing exported.
    assert ensure_bundle(name, tmp_path) == folder / BUNDLE_DIR
    stale = {**wanted, "versions": {**wanted["versions"], "torch": "0.0"}}
    (folder / CONFIG_FILE).write_text(json.dumps(stale))
    assert cached_bundle(folder, wanted) is None
    (folder / CONFIG_FILE).write_text(json.dumps(wanted))
    (folder / BUNDLE_DIR / "model.onnx").write_bytes(b"not onnx")
    assert cached_bundle(folder, wanted) is None  # sha256 no longer the manifest's
    from retinaedge.bench.configs import MODEL_CONFIGS
    from retinaedge.bench.models import CONFIGS

    assert set(MODEL_CONFIGS) == set(CONFIGS)  # the benchmark's choices are the export's recipes
    with pytest.raises(ConfigError, match="unknown benchmark configuration 'r18'"):
        config("r18")
    with pytest.raises(ConfigError, match="does not exist"):
        ensure_bundle(name, tmp_path, tmp_path / "missing.pt")


def test_the_benchmark_refuses_config_with_model_and_config_without_torch(tmp_path: Path) -> None:
    from retinaedge.runtime.cli import main

    out = tmp_path / "out"
    assert main(["benchmark", "--config", "r50-fpn-512", "--model", str(DEMO), "--out", str(out)]) == 2
    proc = run_blocked(
        f"""
        import sys
        from retinaedge.runtime.cli import main
        sys.exit(main(["benchmark", "--config", "r50-fpn-512", "--out", {str(out)!r}]))
        """
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert error["type"] == "invalid-configuration" and "export extra" in error["message"]
    assert not out.exists()
