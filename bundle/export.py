"""TorchScript and ONNX export of the displacement network, with equality checks against the eager network.

The displacement network cannot be scripted (MONAI's ``Warp`` inside ``DVF2DDF`` is not scriptable), so both
exports trace it. The command-line equivalents (from the bundle root)::

    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.yaml \\
        --use_trace True --input_shape "[1,2,128,128]"
    python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.yaml --use_trace True \\
        --input_shape "[1,2,128,128]" \\
        --converter_kwargs "{'opset_version': 16, 'dynamo': False, 'input_names': ['image'], 'output_names': ['pred']}"

ONNX ``GridSample`` supports 2D from opset 16 and N-D (3D) from opset 20: use ``opset_version: 20`` for a 3D network
(add ``--spatial_dims 3``). A traced model has the input size it was traced with baked into its resizing steps:
export at the network size of ``configs/inference.yaml`` (``spatial_size``) and feed that size.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _parser(config_file: str | Sequence[str], meta_file: str | None = None, **override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=config_file)
    if meta_file:
        parser.read_meta(f=meta_file)
    for k, v in override.items():
        parser[k] = v
    return parser


def build_network(
    config_file: str | Sequence[str] | None = None,
    ckpt_file: str | None = None,
    net_id: str = "network_def",
    **override,
) -> torch.nn.Module:
    """``network_def`` of ``config_file`` (default configs/inference.yaml) with the weights of ``ckpt_file``."""
    from scripts.checkpoint import load_weights

    config_file = config_file or str(ROOT / "configs" / "inference.yaml")
    net = _parser(config_file, **override).get_parsed_content(net_id)
    if ckpt_file is not None:
        load_weights(net, ckpt_file, "network")
    return net.eval()


def _export(exporter, ckpt_file, filepath, input_shape, config_file, meta_file, **kwargs) -> str:
    exporter(
        net_id="network_def",
        filepath=str(filepath),
        ckpt_file=str(ckpt_file),
        meta_file=meta_file or str(ROOT / "configs" / "metadata.json"),
        config_file=config_file or str(ROOT / "configs" / "inference.yaml"),
        use_trace=True,
        input_shape=list(input_shape),
        **kwargs,
    )
    return str(filepath)


def export_torchscript(
    ckpt_file: str,
    filepath: str,
    input_shape: Sequence[int] = (1, 2, 128, 128),
    config_file: str | None = None,
    meta_file: str | None = None,
    **override,
) -> str:
    """``monai.bundle.ckpt_export`` with tracing (the only way for this network)."""
    from monai.bundle import ckpt_export

    return _export(ckpt_export, ckpt_file, filepath, input_shape, config_file, meta_file, **override)


def export_onnx(
    ckpt_file: str,
    filepath: str,
    input_shape: Sequence[int] = (1, 2, 128, 128),
    config_file: str | None = None,
    meta_file: str | None = None,
    opset_version: int | None = None,
    **override,
) -> str:
    """``monai.bundle.onnx_export`` with the TorchScript-based (non-dynamo) exporter; opset 16 (2D) / 20 (3D)."""
    from monai.bundle import onnx_export

    opset = opset_version or (16 if len(input_shape) == 4 else 20)
    kwargs = {"opset_version": opset, "dynamo": False, "input_names": ["image"], "output_names": ["pred"]}
    return _export(
        onnx_export, ckpt_file, filepath, input_shape, config_file, meta_file, converter_kwargs=kwargs, **override
    )


def _example(input_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A smooth moving/fixed pair (a ring and a shifted ring) rather than noise, so that the DDF is not trivial."""
    g = torch.Generator().manual_seed(seed)
    spatial = input_shape[2:]
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in spatial], indexing="ij")
    r = torch.sqrt(sum(a**2 for a in axes))
    r2 = torch.sqrt((axes[0] - 0.08) ** 2 + sum(a**2 for a in axes[1:]))
    m = torch.exp(-(((r - 0.5) / 0.15) ** 2)) + 0.05 * torch.rand(r.shape, generator=g)
    f = torch.exp(-(((r2 - 0.45) / 0.15) ** 2)) + 0.05 * torch.rand(r.shape, generator=g)
    x = torch.stack([m / m.max(), f / f.max()])[None]
    return x.expand(input_shape[0], *x.shape[1:]).contiguous().float()


def check_torchscript(ts_file: str, network: torch.nn.Module, input_shape: Sequence[int], atol: float = 1e-5) -> float:
    """Max |TorchScript - eager| on an example pair; raises AssertionError above ``atol``. Also checks the
    bundle's metadata travelled with the TorchScript file."""
    from monai.data import load_net_with_metadata

    ts, meta, _ = load_net_with_metadata(ts_file, map_location="cpu")
    if not meta or "network_data_format" not in meta:
        raise AssertionError(f"{ts_file}: no bundle metadata in the TorchScript file.")
    x = _example(input_shape)
    with torch.no_grad():
        a, b = network.eval()(x), ts(x)
    err = float((a - b).abs().max())
    if not err <= atol:
        raise AssertionError(f"{ts_file}: TorchScript differs from eager by {err:.3g} (> {atol}).")
    return err


def check_onnx(onnx_file: str, network: torch.nn.Module, input_shape: Sequence[int], atol: float = 1e-4) -> float:
    """Max |onnxruntime - eager| on an example pair; raises AssertionError above ``atol``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = _example(input_shape)
    with torch.no_grad():
        a = network.eval()(x)
    b = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    err = float((a - b).abs().max())
    if not err <= atol:
        raise AssertionError(f"{onnx_file}: onnxruntime differs from eager by {err:.3g} (> {atol}).")
    return err


def export(
    ckpt_file: str | None = None,
    out_dir: str | None = None,
    input_shape: Sequence[int] = (1, 2, 128, 128),
    onnx: bool = True,
) -> dict:
    """Export models/model.pt (or ``ckpt_file``) to ``model.ts`` (+ ``model.onnx``) in ``out_dir`` (default
    models/) and check both against the eager network. Returns the paths and the max differences."""
    ckpt_file = ckpt_file or str(ROOT / "models" / "model.pt")
    out = Path(out_dir or ROOT / "models")
    out.mkdir(parents=True, exist_ok=True)
    input_shape = [int(s) for s in input_shape]
    nd = len(input_shape) - 2
    override = {} if nd == 2 else {"spatial_dims": nd}
    net = build_network(ckpt_file=ckpt_file, **override)
    res = {"model.ts": export_torchscript(ckpt_file, str(out / "model.ts"), input_shape, **override)}
    res["ts_max_abs_diff"] = check_torchscript(res["model.ts"], net, input_shape)
    if onnx:
        res["model.onnx"] = export_onnx(ckpt_file, str(out / "model.onnx"), input_shape, **override)
        res["onnx_max_abs_diff"] = check_onnx(res["model.onnx"], net, input_shape)
    return res


def fresh_weights(
    path: str | os.PathLike | None = None, spatial_dims: int = 2, seed: int = 0, std: float = 0.02
) -> str:
    """Save the state dict of a freshly initialised displacement network with a non-trivial flow head (for checks
    and tests that must not depend on shipped weights). Returns the path."""
    torch.manual_seed(seed)
    net = build_network(spatial_dims=spatial_dims)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    path = path or tempfile.mkstemp(suffix=".pt")[1]
    torch.save(net.state_dict(), path)
    return str(path)
