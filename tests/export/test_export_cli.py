"""``retinaedge export`` from the command line: checkpoints as training scripts save them, wrong inputs."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from retinaedge.runtime.bundle import PLUGIN_MODEL_FILE, load_bundle
from support.models import biased_retinanet
from support.paths import CORPUS

pytestmark = pytest.mark.export


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``retinaedge *args`` in this process (what a subprocess would print, without importing torch again
    for each call): its exit code and what it wrote on stdout and stderr."""
    from retinaedge.runtime.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["retinaedge", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-training-script style checkpoint of a 2-class ResNet-34 FPN RetinaNet."""
    import torch

    path = tmp_path_factory.mktemp("ckpt") / "model_25.pth"
    model = biased_retinanet("resnet34_fpn", 2, seed=3, frozen_bn=True)
    torch.save({"model": model.state_dict(), "epoch": 25, "args": {"lr": 0.01}}, path)
    return path


@pytest.mark.slow
def test_cli_export_state_dict_grey_nonsquare_with_plugin(tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "bundle"
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps({"cyst": {"value": "441457006", "scheme": "SCT", "meaning": "Cyst"}}))
    proc = cli(
        "export",
        str(checkpoint),
        "--arch",
        "resnet34_fpn",
        "--out",
        str(out),
        "--class-codes",
        str(codes),
        # Non-square and small (no check needs pixels; PyTorch and ONNX Runtime run each image about four
        # times): the width's pyramid goes odd and rounds up (36, 18, 9, 5, 3) as 416 did (52, 26, 13, 7, 4).
        "--input-size",
        "192x288",
        "--class-names",
        "tumour,cyst",
        "--channels",
        "1",
        "--window",
        "fixed:40,80",
        "--trt-plugin",
        "--synthetic",
        "2",
        "--parity-dicom",
        str(CORPUS / "CT_small.dcm"),
        str(CORPUS / "MR_small.dcm"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["passed"] is True and result["parity"]["match_rate"] >= 0.995
    bundle = load_bundle(out)
    m = bundle.manifest
    assert (m.input.channels, m.input.height, m.input.width) == (1, 192, 288)
    assert m.preprocessing.window.policy == "fixed" and m.preprocessing.window.center == 40.0
    assert (
        m.source["kind"] == "state_dict"
        and m.source["file"] == "model_25.pth"
        and len(m.source["sha256"]) == 64
    )
    assert m.architecture == "resnet34_fpn" and m.class_names == ("tumour", "cyst")
    assert {k: (c.value, c.scheme, c.meaning) for k, c in m.class_codes.items()} == {
        "cyst": ("441457006", "SCT", "Cyst")
    }

    # The plugin variant: checker passes, one EfficientNMS_TRT node, semantics stated in parity.json.
    plugin = onnx.load(str(out / PLUGIN_MODEL_FILE))
    onnx.checker.check_model(plugin)
    ops = [n.op_type for n in plugin.graph.node]
    assert ops.count("EfficientNMS_TRT") == 1 and "NonMaxSuppression" not in ops
    parity = json.loads((out / "parity.json").read_text())
    sources = [image["source"] for image in parity["images"]]
    assert sources == ["synthetic:0", "synthetic:1", "dicom:0:CT_small.dcm#0", "dicom:1:MR_small.dcm#0"]
    assert all(image["match_rate"] >= 0.99 for image in parity["images"])
    trt = parity["efficientnms_trt"]
    assert trt["structure"]["attributes"]["max_output_boxes"] == 300
    assert any("4096" in d for d in trt["semantics"]["differences"])
    assert 0.0 <= trt["emulated_parity"]["totals"]["match_rate"] <= 1.0
    # One grey channel crosses into the graph.
    dims = [
        d.dim_param or d.dim_value
        for d in onnx.load(str(bundle.model_path)).graph.input[0].type.tensor_type.shape.dim
    ]
    assert dims == ["N", 1, 192, 288]


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        ({"cyst": {"value": "1", "scheme": "SCT"}}, 'exactly "value", "scheme", "meaning"'),
        ({"cyst": {"value": "1", "scheme": "SCT", "meaning": "x" * 65}}, "code meaning to 64"),
        (["cyst"], "class codes are an object"),
    ],
)
def test_cli_refuses_malformed_class_codes_before_reading_the_checkpoint(
    tmp_path: Path, codes: object, message: str
) -> None:
    path = tmp_path / "codes.json"
    path.write_text(json.dumps(codes))
    proc = cli(
        "export",
        str(tmp_path / "absent.pth"),
        "--arch",
        "resnet34_fpn",
        "--input-size",
        "256",
        "--class-names",
        "tumour,cyst",
        "--out",
        str(tmp_path / "b"),
        "--class-codes",
        str(path),
    )
    assert proc.returncode == 2
    err = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert err["message"].startswith(f"--class-codes {path}: ") and message in err["message"]
    assert not (tmp_path / "b").exists()


def test_cli_reports_mismatched_keys(tmp_path: Path, checkpoint: Path) -> None:
    proc = cli(
        "export",
        str(checkpoint),
        "--arch",
        "resnet34_fpn",
        "--out",
        str(tmp_path / "b"),
        "--input-size",
        "256",
        "--num-classes",
        "5",
    )
    assert proc.returncode == 1
    err = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert err["type"] == "checkpoint-mismatch"
    assert "head.classification_head.cls_logits.weight" in err["message"]
    assert "(18, 256, 3, 3) != (45, 256, 3, 3)" in err["message"]
    assert not (tmp_path / "b").exists()


def test_cli_wrong_architecture_names_keys(tmp_path: Path, checkpoint: Path) -> None:
    proc = cli(
        "export",
        str(checkpoint),
        "--arch",
        "resnet18_fpn",
        "--out",
        str(tmp_path / "b"),
        "--input-size",
        "256",
        "--num-classes",
        "2",
    )
    assert proc.returncode == 1
    err = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert err["type"] == "checkpoint-mismatch" and "unexpected keys: backbone.body.layer" in err["message"]


def test_pickled_model_needs_explicit_option(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "whole.pt"
    torch.save(biased_retinanet("resnet18_fpn", 1), path)
    proc = cli(
        "export",
        str(path),
        "--arch",
        "resnet18_fpn",
        "--out",
        str(tmp_path / "b"),
        "--input-size",
        "256",
        "--num-classes",
        "1",
    )
    assert proc.returncode == 1
    assert "--pickled-model" in json.loads(proc.stdout.strip().splitlines()[-1])["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--input-size", "250", "--num-classes", "2"], "multiple of 32"),
        (["--input-size", "256", "--class-names", "a,b", "--num-classes", "3"], "--num-classes 3"),
        (
            ["--input-size", "256", "--num-classes", "2", "--trt-plugin", "--detections-per-img", "5000"],
            "4096",
        ),
        (["--input-size", "256", "--num-classes", "2", "--nms-iou", "1.5"], "IoU"),
        (["--input-size", "256", "--num-classes", "2", "--window", "fixed:40,-1"], "window width"),
    ],
)
def test_impossible_options_are_refused(
    tmp_path: Path, checkpoint: Path, extra: list[str], needle: str
) -> None:
    proc = cli("export", str(checkpoint), "--arch", "resnet34_fpn", "--out", str(tmp_path / "b"), *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert err["type"] == "invalid-configuration" and needle in err["message"]


def test_every_verb_has_help() -> None:
    from retinaedge.runtime.cli import VERBS

    for verb in VERBS:
        proc = cli(verb, "--help")
        assert proc.returncode == 0 and "usage: retinaedge" in proc.stdout


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    from retinaedge.export import export_retinanet
    from retinaedge.runtime.errors import ConfigError

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        export_retinanet(
            biased_retinanet("resnet18_fpn", 1), tmp_path / "b", input_size=(256, 256), class_names=["x"]
        )


def test_an_empty_output_directory_is_accepted(tmp_path: Path) -> None:
    """A fresh ``tempfile.TemporaryDirectory()`` is a fine place for a bundle; anything else existing is not."""
    from retinaedge.export.exporter import check_output_dir
    from retinaedge.runtime.errors import ConfigError

    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / ".keep").write_text("")
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    for taken in ("full", "file", "link"):
        with pytest.raises(ConfigError, match="already exists"):
            check_output_dir(tmp_path / taken, overwrite=False)
        check_output_dir(tmp_path / taken, overwrite=True)


def test_channels_one_replicates(small_bundle: Path) -> None:
    """Sanity of the session bundle used by the torch-free tests."""
    b = load_bundle(small_bundle)
    assert b.manifest.input.channels == 3 and np.isfinite(b.manifest.postprocess.bbox_xform_clip)
