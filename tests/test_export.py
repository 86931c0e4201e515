"""Export: ONNX (run by onnxruntime on the CPU) and .pt2 (``torch.export.load``) match the library's
``apply`` in eval mode to 1e-4, at two batch sizes and, where H and W are dynamic, two sizes; the
models that cannot take dynamic H, W say so; a wrong channel count is refused with a clear message.

Checkpoints come from ``tiny_models.make_checkpoint`` (shared with test_predict.py).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import SIZE, TINY, make_checkpoint

from functional_seg.cli import main
from functional_seg.core import random as jr
from functional_seg.data.preprocess import Preprocess
from functional_seg.models import create_model

DYNAMIC_HW = {"segnet", "segnet_dsc", "unet", "segformer"}  # vit: static (see functional_seg/export.py)


def _reference(model, params, state, pre, x):
    with torch.no_grad():
        return model.apply(params, state, pre.model_input(x), train=False)[0]


@pytest.fixture(scope="module", params=sorted(TINY))
def exported(request, tmp_path_factory):
    """Per model: the checkpoint exported to both formats through ``export_model``."""
    import onnxruntime as ort

    from functional_seg.export import export_model

    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    model, params, state, pre = make_checkpoint(tmp / "model.safetensors", name)
    onnx = export_model(model, params, state, pre, tmp / "model.onnx", format="onnx")
    pt2 = export_model(model, params, state, pre, tmp / "model.pt2", format="pt2")
    session = ort.InferenceSession(str(onnx.path), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(pt2.path)).module()
    runners = {"onnx": lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0]),
               "pt2": lambda x: program(x)}
    return name, (model, params, state, pre), {"onnx": onnx, "pt2": pt2}, runners


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_matches_apply(exported, fmt):
    name, (model, params, state, pre), results, runners = exported
    assert results[fmt].dynamic_hw == (name in DYNAMIC_HW)
    assert bool(results[fmt].note) == (name not in DYNAMIC_HW)  # a static export says why
    sizes = [(SIZE, SIZE), (48, 64)] if name in DYNAMIC_HW else [(SIZE, SIZE)]
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # dynamic batch
        for h, w in sizes:
            x = torch.rand(batch, 3, h, w, generator=gen)
            with torch.no_grad():
                out = runners[fmt](x)
            ref = _reference(model, params, state, pre, x)
            assert out.shape == (batch, model.num_classes, h, w) and ref.std() > 1e-3  # not vacuous
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_wrong_channel_count_is_refused_clearly(exported):
    _, _, _, runners = exported
    x = torch.rand(1, 4, SIZE, SIZE)
    with pytest.raises(Exception) as onnx_err:
        runners["onnx"](x)
    # onnxruntime: "Got invalid dimensions for input: x for the following indices index: 1 Got: 4 Expected: 3"
    assert "index: 1 Got: 4 Expected: 3" in str(onnx_err.value)
    with pytest.raises(Exception) as pt2_err:
        runners["pt2"](x)
    assert "x.size()[1] == 3" in str(pt2_err.value)  # torch.export's input guard names the channel axis


def test_module_refuses_wrong_channels_by_name():
    from functional_seg.export import ExportModule

    model = create_model("segnet", **TINY["segnet"])
    params, state = model.init(jr.key(0))
    module = ExportModule(model, params, state, Preprocess(size=SIZE))
    with pytest.raises(ValueError, match=r"segnet: x must be float \[N, 3, H, W\], got torch.float32 \(1, 4, 32, 32\)"):
        module(torch.rand(1, 4, SIZE, SIZE))


def test_vit_cannot_take_dynamic_hw_and_says_why():
    from functional_seg.export import ExportError, ExportModule, trace

    model = create_model("vit", **TINY["vit"])
    params, state = model.init(jr.key(0))
    module = ExportModule(model, params, state, Preprocess(size=SIZE)).eval()
    with pytest.raises(ExportError, match=r"vit: cannot export with dynamic H, W: \w+"):
        trace(module, SIZE, dynamic_hw=True)
    _, dynamic, note = trace(module, SIZE)
    assert not dynamic and note.startswith("vit: exported with static H, W = 32 (dynamic batch only)")


def test_cli_export_onnx_and_pt2(tmp_path, capsys):
    import onnx

    ck = tmp_path / "ck.safetensors"
    model, params, state, pre = make_checkpoint(ck, "unet")
    assert main(["export", "--checkpoint", str(ck), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "m.onnx (onnx; input float32 RGB in [0, 1] [N, 3, H, W], H and W multiples of the stride" in out
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert len(proto.graph.initializer) >= len(list(params)) and proto.graph.input[0].name == "x"
    assert main(["export", "--checkpoint", str(ck), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 0
    program = torch.export.load(str(tmp_path / "m.pt2"))
    assert any(k.startswith("params.") for k in program.state_dict)  # the weights travel in the file
    x = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(program.module()(x), _reference(model, params, state, pre, x), atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_cli_export_vit_prints_the_static_note(tmp_path, capsys):
    ck = tmp_path / "vit.safetensors"
    make_checkpoint(ck, "vit")
    assert main(["export", "--checkpoint", str(ck), "--format", "pt2", "--out", str(tmp_path / "v.pt2")]) == 0
    out = capsys.readouterr().out
    assert "note: vit: exported with static H, W = 32 (dynamic batch only)" in out
    assert "[N, 3, 32, 32]" in out


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    ck = tmp_path / "ck.safetensors"
    make_checkpoint(ck, "segnet")
    assert main(["export", "--checkpoint", str(ck), "--format", "pt2", "--out", str(tmp_path / "m.pt2"),
                 "--member", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds one model, not an ensemble" in err
    assert main(["export", "--checkpoint", str(ck), "--format", "pt2", "--out", str(tmp_path / "m.pt2"),
                 "--weights", "ema"]) == 2
    assert "EMA" in capsys.readouterr().err
