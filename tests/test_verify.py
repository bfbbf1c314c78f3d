"""`ditq verify`: passes on good conversions, and catches each kind of damage."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoint.fixtures_ckpt import reference_kernels  # noqa: F401 (fixture)
from checkpoint.fixtures_ckpt import comfy_bytes, fresh_gen, rand, save, small_model
from ditq import cli
from ditq.convert import convert_checkpoint
from ditq.verify import verify_checkpoint

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture
def converted(tmp_path):
    gen, seed = fresh_gen()
    src = save(tmp_path / "src.safetensors", small_model(gen))
    dst = tmp_path / "dst.safetensors"
    convert_checkpoint(src, dst, preset="generic", min_elements=0, format="int8-row")
    return src, dst, seed


def rewrite(path, edit):
    """Rewrite a safetensors file with ``edit(tensors, metadata)`` applied (simulates damage)."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    edit(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def test_passes_and_reports(converted, capsys):
    src, dst, seed = converted
    rep = verify_checkpoint(src, dst)
    assert rep.ok, (rep.summary(), seed)
    q = [c for c in rep.checks if c.kind == "int8-row"]
    assert len(q) == 5 and all(c.max_steps <= 0.5 + 1e-3 and 0 < c.rel_error < 0.02 for c in q)
    assert cli.main(["verify", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "int8-row" in out


def _flip_code(t, m):
    w = t["blocks.0.attn.to_q.weight"]
    w[3, 4] = 60 if int(w[3, 4]) < 0 else -60


DAMAGE = {
    "flipped code": (_flip_code, "steps of the format"),
    "scale off by 10%": (lambda t, m: t["blocks.0.ff.up.weight_scale"].mul_(1.1), "steps of the format"),
    "zero scale": (lambda t, m: t["blocks.0.ff.up.weight_scale"].__setitem__((0, 0), 0.0), "zero, negative"),
    "code -128": (lambda t, m: t["blocks.0.attn.to_k.weight"].__setitem__((0, 0), -128), "-128"),
    "kept tensor changed": (lambda t, m: t["blocks.0.norm1.weight"].add_(0.5), "differs from SRC"),
    "extra key": (lambda t, m: t.__setitem__("surprise.weight", torch.ones(2)), "not in SRC"),
    "missing key": (lambda t, m: t.pop("blocks.0.attn.to_q.bias"), "missing from DST"),
    "shape": (lambda t, m: t.__setitem__("pos_table", torch.zeros(1, 8, 64, dtype=torch.bfloat16)), "shape"),
    "metadata disagrees": (
        lambda t, m: m.__setitem__("_quantization_metadata", json.dumps(
            {"format_version": "1.0", "layers": {k[:-12]: {"format": "int8_tensorwise", "per_row": True}
                                                 for k in t if k.endswith(".comfy_quant")}})),
        "disagree",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_catches_damage(converted, damage, capsys):
    src, dst, seed = converted
    edit, message = DAMAGE[damage]
    rewrite(dst, edit)
    rep = verify_checkpoint(src, dst)
    assert not rep.ok, (damage, seed)
    assert message in rep.summary(), rep.summary()
    assert cli.main(["verify", str(src), str(dst), "-q"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_foreign_file_with_truncating_rounding(tmp_path):
    """A file from a tool that truncates instead of rounding (the peer's bug) is within 1 step: accepted
    with a note when DST carries no ditq metadata, refused when round-to-nearest is required."""
    gen, seed = fresh_gen()
    w = rand((256, 256), gen, torch.float32)
    s = w.abs().amax(dim=1, keepdim=True) / 127
    q = torch.trunc(w / s).to(torch.int8)
    src = save(tmp_path / "src.safetensors", {"l.weight": w})
    dst = save(tmp_path / "dst.safetensors", {"l.weight": q, "l.weight_scale": s,
                                              "l.comfy_quant": comfy_bytes({"format": "int8_tensorwise"})})
    rep = verify_checkpoint(src, dst)
    assert rep.ok and any("no ditq metadata" in n for n in rep.notes), seed
    assert 0.5 < rep.checks[0].max_steps <= 1.0
    assert not verify_checkpoint(src, dst, rounding="nearest").ok
