"""`ditq convert --target-cos T --calibration F`: per-layer formats from measured output errors on the
calibration rows under the whole-model budget 1/2 sum e_l^2 <= 1 - T, checked against the written file
through ditq's runtime, the model output on the calibration inputs, a looser target, determinism, the speed
table's ranking, and every refusal before anything is written.

The model is a small residual MLP whose first layer sees a few 25x outlier channels (as real DiT
activations do); its seed is fixed because the whole-model claim rests on the budget's estimate, not on an
exact bound."""

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import ditq
from checkpoint.fixtures_ckpt import save
from ditq import cli
from ditq import formats as F
from ditq import rounding as R
from ditq.checkpoint import layout as L
from ditq.checkpoint.io import open_checkpoint
from ditq.convert import convert_checkpoint
from ditq.convert.calibrate import capture_calibration
from ditq.errors import CheckpointError, DitqError
from ditq.precision import cosine
from ditq.verify import verify_checkpoint

D = 256
OUTLIERS = [3, 40, 77, 101]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)  # fed the raw inputs, outliers included
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)
        self.out = nn.Linear(D, 200)  # N % 128 != 0: the block formats do not apply

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc2(nn.functional.gelu(self.fc1(h)))
        return self.out(h)


def sample(g, n):
    x = torch.randn(n, D, generator=g)
    x[:, OUTLIERS] *= 25.0
    return x


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    torch.manual_seed(8)
    model = MLP().eval().requires_grad_(False)
    with torch.no_grad():  # the checkpoint is bf16: the float model is its exact widening
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    g = torch.Generator().manual_seed(9)
    inputs = [(sample(g, 96),) for _ in range(4)]
    src = save(d / "src.safetensors", {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    cal = capture_calibration(model, inputs, sample_rows=256)
    cal.save(d / "cal.safetensors")
    return SimpleNamespace(dir=d, src=src, cal=d / "cal.safetensors", model=model, inputs=inputs, stats=cal)


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def loaded(case, dst):
    q = copy.deepcopy(case.model)
    ditq.load_quantized(q, dst, dtype=torch.float32)
    return q


def model_cos(q, case):
    with torch.no_grad():
        return min(cosine(q(*i), case.model(*i)) for i in case.inputs)


def test_cli_end_to_end_meets_target(case, tmp_path, capsys):
    dst, rep = tmp_path / "out.safetensors", tmp_path / "r.json"
    rc = cli.main(["convert", str(case.src), "-o", str(dst), "--target-cos", "0.999", "--calibration", str(case.cal),
                   "--json", str(rep)])
    out = capsys.readouterr().out
    assert rc == 0, out
    print(out)
    assert "--target-cos 0.999" in out and "GEMM matched" in out and "one format for all" in out
    p = json.loads(rep.read_text())["precision"]
    budget = 1 - 0.999
    by = {r["key"]: r for r in p["layers"]}
    assert sorted(by) == ["fc1.weight", "fc2.weight", "inp.weight", "out.weight"]
    assert p["met"] and p["estimate"] <= budget
    assert p["estimate"] == pytest.approx(sum(0.5 * r["rel_error"] ** 2 for r in p["layers"]), rel=1e-12)
    assert len({r["format"] for r in p["layers"]}) >= 2  # a mix, not one format
    assert "int8-block" in by["out.weight"]["skipped"] and "int8-block" not in by["out.weight"]["errors"]
    for r in p["layers"]:  # every layer stands on the fastest rung its share of the budget allows
        assert r["order"][-1] == "bf16" and r["format"] in r["order"]

    # the file holds exactly the reported choices
    with open_checkpoint(dst) as ck:
        written = {e.key: (e.fmt.name if e.fmt else "bf16") + ("+hadamard" if e.rotation else "")
                   for e in L.scan(ck).entries if e.key.endswith(".weight")}
    assert written == {k: r["format"] for k, r in by.items()}
    assert verify_checkpoint(case.src, dst).ok

    # independent check through ditq's runtime: each layer's output error on its calibration rows
    q = loaded(case, dst)
    stats = R.load_calibration(case.cal)
    total = 0.0
    for name, mod in linears(q).items():
        x = stats.get(name).sample
        y = x.double() @ linears(case.model)[name].weight.double().t()
        e = F.relative_error(nn.functional.linear(x, mod.weight).double(), y)
        assert e == pytest.approx(by[f"{name}.weight"]["rel_error"], rel=2e-3, abs=1e-6), name
        total += 0.5 * e * e
    assert total <= budget * 1.002
    # and the whole model on the calibration inputs
    assert model_cos(q, case) >= 0.999


def test_looser_target_picks_faster_formats(case, tmp_path):
    reps = {}
    for t in (0.99, 0.999, 0.9999):
        dst = tmp_path / f"{t}.safetensors"
        reps[t] = convert_checkpoint(case.src, dst, target_cos=t, calibration=case.cal).precision
        assert reps[t]["estimate"] <= 1 - t
        assert model_cos(loaded(case, dst), case) >= t, t
    for loose, tight in ((0.99, 0.999), (0.999, 0.9999)):
        a, b = reps[loose]["layers"], reps[tight]["layers"]
        rungs = [(r["order"].index(r["format"]), s["order"].index(s["format"])) for r, s in zip(a, b)]
        assert all(i <= j for i, j in rungs), rungs
        assert any(i < j for i, j in rungs), rungs
        assert reps[loose]["est_speed"] >= reps[tight]["est_speed"]
    # the outlier-fed layer needs more precision than the others at the tight target
    tight = {r["key"]: r for r in reps[0.9999]["layers"]}
    assert tight["inp.weight"]["errors"]["int8-row"] > max(tight[k]["errors"]["int8-row"] for k in tight if k != "inp.weight")


def test_deterministic(case, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ra = convert_checkpoint(case.src, a, target_cos=0.999, calibration=case.cal).precision
    rb = convert_checkpoint(case.src, b, target_cos=0.999, calibration=str(case.cal)).precision
    assert a.read_bytes() == b.read_bytes()
    ra.pop("seconds"), rb.pop("seconds")
    assert ra == rb


def write_table(path, ratios):
    path.write_text(json.dumps({"gpu": "test GPU", "shapes": [
        {"model": "t", "M": 4096, "N": 256, "K": 256, "ratio": ratios},
        {"model": "far", "M": 4096, "N": 16384, "K": 16384, "ratio": {k: 1.0 for k in ratios}},
    ]}))
    return path


def test_speed_table_ranks_the_formats(case, tmp_path):
    """With a table where int8-block is fastest, a loose target gives every layer its fastest format per the
    table (int8-row where the block formats do not apply); 'none' falls back to the default order."""
    table = write_table(tmp_path / "gemm-test.json", {"int8-block": 3.0, "int8-row": 2.0, "fp8-row": 1.5})
    p = convert_checkpoint(case.src, tmp_path / "t.safetensors", target_cos=0.5, calibration=case.cal,
                           speed_table=table).precision
    by = {r["key"]: r for r in p["layers"]}
    assert by["inp.weight"]["order"] == ["int8-block", "int8-row", "int8-row+hadamard", "fp8-row", "bf16"]
    assert by["inp.weight"]["format"] == "int8-block" and by["inp.weight"]["speed"] == 3.0
    assert by["inp.weight"]["gemm"] == "4096x256x256 (t)"
    assert by["out.weight"]["format"] == "int8-row"  # 200 x 256: no block format
    assert by["inp.weight"]["speeds"]["int8-row+hadamard"] == 2.0  # no rotation benchmark beside it: as int8-row
    assert "gemm-test.json" in p["speed_source"]
    p = convert_checkpoint(case.src, tmp_path / "n.safetensors", target_cos=0.5, calibration=case.cal,
                           speed_table="none").precision
    assert all(r["format"] == "fp8-row" and r["speed"] is None for r in p["layers"])


def test_tokens_pick_the_table_rows(case, tmp_path):
    """--tokens N reads the speed table at M=N rows (a video model's GEMMs are much taller than 4096 rows)."""
    rows = []
    for m, ratio in ((4096, {"int8-row": 2.0, "fp8-row": 1.5}), (32760, {"int8-row": 1.2, "fp8-row": 1.9})):
        rows.append({"model": f"m{m}", "M": m, "N": D, "K": D, "ratio": ratio})
    path = tmp_path / "gemm-two.json"
    path.write_text(json.dumps({"gpu": "test GPU", "shapes": rows}))
    small = convert_checkpoint(case.src, tmp_path / "a.safetensors", target_cos=0.5, calibration=case.cal,
                               speed_table=str(path)).precision
    tall = convert_checkpoint(case.src, tmp_path / "b.safetensors", target_cos=0.5, calibration=case.cal,
                              speed_table=str(path), tokens=32760).precision
    a, b = ({r["key"]: r for r in p["layers"]}["inp.weight"] for p in (small, tall))
    assert a["format"] == "int8-row" and a["gemm"].startswith("4096x") and "4096 tokens" in small["speed_source"]
    assert b["format"] == "fp8-row" and b["gemm"].startswith("32760x") and "32760 tokens" in tall["speed_source"]
    rc = cli.main(["convert", str(case.src), "-o", str(tmp_path / "c.safetensors"), "--target-cos", "0.5",
                   "--calibration", str(case.cal), "--speed-table", str(path), "--tokens", "32760", "-q",
                   "--json", str(tmp_path / "c.json")])
    assert rc == 0
    got = json.loads((tmp_path / "c.json").read_text())
    assert "32760 tokens" in json.dumps(got)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(DitqError, match="--tokens"):
            convert_checkpoint(case.src, tmp_path / "d.safetensors", target_cos=0.5, calibration=case.cal, tokens=bad)
    assert not (tmp_path / "d.safetensors").exists()


def test_uncovered_layer_stays_float(case, tmp_path):
    stats = R.CalibrationStats({k: v for k, v in case.stats.layers.items() if k != "fc2"}, {}, {})
    stats.save(tmp_path / "part.safetensors")
    rep = convert_checkpoint(case.src, tmp_path / "o.safetensors", target_cos=0.999,
                             calibration=tmp_path / "part.safetensors")
    rec = {r.key: r for r in rep.layers}["fc2.weight"]
    assert rec.action == "kept" and "not in the calibration file" in rec.reason
    assert rep.precision["uncovered"] == ["fc2.weight"] and any("not in the calibration" in w for w in rep.warnings)
    assert load_file(tmp_path / "o.safetensors")["fc2.weight"].dtype == torch.bfloat16


def _stats(names_k, rows=8):
    g = torch.Generator().manual_seed(0)
    return R.CalibrationStats({n: R.LayerStats.from_activations(torch.randn(64, k, generator=g),
                                                                heldout_fraction=rows / 64) for n, k in names_k})


@pytest.mark.parametrize("what, match", [
    ("no calibration", "--target-cos needs --calibration"),
    ("missing file", "does not exist"),
    ("other model", "covers none of the 4 quantizable layers"),
    ("other widths", "statistics have K=128"),
    ("no held-out rows", "no held-out input rows"),
    ("with --format", "exclude each other"),
    ("with --rotation", "drop --rounding learned / --rotation"),
    ("with --max-outlier-ratio", "drop --max-outlier-ratio"),
    ("target 1.5", r"\(0, 1\]"),
    ("unknown candidate", "unknown candidate"),
    ("candidates alone", "only apply with --target-cos"),
    ("tokens alone", "only apply with --target-cos"),
    ("bad speed table", "speed table"),
])
def test_refusals_write_nothing(case, tmp_path, capsys, what, match):
    dst = tmp_path / "out" / "o.safetensors"
    dst.parent.mkdir()
    cal = str(case.cal)
    extra = []
    if what == "other model":
        _stats([("blocks.0.attn.to_q", D)]).save(cal := str(tmp_path / "c.safetensors"))
    elif what == "other widths":
        _stats([("inp", 128), ("fc1", 256)]).save(cal := str(tmp_path / "c.safetensors"))
    elif what == "no held-out rows":
        _stats([("inp", D), ("fc1", D), ("fc2", 2 * D), ("out", D)], rows=0).save(cal := str(tmp_path / "c.safetensors"))
    elif what == "missing file":
        cal = str(tmp_path / "nope.safetensors")
    args = {"no calibration": ["--target-cos", "0.999"],
            "with --format": ["--target-cos", "0.999", "--format", "int8-row", "--calibration", cal],
            "with --rotation": ["--target-cos", "0.999", "--rotation", "hadamard", "--calibration", cal],
            "with --max-outlier-ratio": ["--target-cos", "0.999", "--max-outlier-ratio", "50", "--calibration", cal],
            "target 1.5": ["--target-cos", "1.5", "--calibration", cal],
            "unknown candidate": ["--target-cos", "0.999", "--candidates", "fp8-row,int4", "--calibration", cal],
            "candidates alone": ["--candidates", "fp8-row,bf16"],
            "tokens alone": ["--tokens", "32760"],
            "bad speed table": ["--target-cos", "0.999", "--speed-table", str(tmp_path / "x.json"), "--calibration", cal],
            }.get(what, ["--target-cos", "0.999", "--calibration", cal]) + extra
    rc = cli.main(["convert", str(case.src), "-o", str(dst), *args])
    err = capsys.readouterr().err
    assert rc == 1 and "error:" in err
    assert __import__("re").search(match, err), err
    assert os.listdir(dst.parent) == []


def test_nan_weight_before_writing_or_kept(case, tmp_path):
    sd = load_file(case.src)
    sd["fc1.weight"][3, 5] = float("nan")
    src = save(tmp_path / "nan.safetensors", sd)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DitqError, match="nothing was written"):
        convert_checkpoint(src, out / "o.safetensors", target_cos=0.999, calibration=case.cal)
    assert os.listdir(out) == []
    rep = convert_checkpoint(src, out / "o.safetensors", target_cos=0.999, calibration=case.cal, keep_nonfinite=True)
    assert rep.precision["kept_nonfinite"] == ["fc1.weight"]
    assert {r.key: r.action for r in rep.layers}["fc1.weight"] == "kept"
    assert "fc1.weight" not in {r["key"] for r in rep.precision["layers"]}


def test_api_checks(case, tmp_path):
    with pytest.raises(CheckpointError):
        convert_checkpoint(case.src, tmp_path / "o.safetensors", target_cos=0.999, calibration=tmp_path / "none.st")
    with pytest.raises(DitqError, match="--rounding learned"):
        convert_checkpoint(case.src, tmp_path / "o.safetensors", target_cos=0.999, calibration=case.cal,
                           rounding="learned")
    assert not (tmp_path / "o.safetensors").exists()


# -- measured gains (`ditq calibrate --gains`) ----------------------------------------------------------------
def test_measure_gains(case):
    from ditq.convert.calibrate import measure_gains

    g = measure_gains(case.model, case.inputs, batches=2)
    assert set(g) == {"inp", "fc1", "fc2", "out"} and all(v > 0 for v in g.values())
    assert g["out"] == pytest.approx(1.0, abs=0.05)  # its output is the model's output
    assert measure_gains(case.model, case.inputs, batches=2) == g  # seeded
    # a branch scaled down 10x moves the output 10x less (per relative error of its own output)
    small = copy.deepcopy(case.model)
    with torch.no_grad():
        small.fc2.weight.mul_(0.1), small.fc2.bias.mul_(0.1)
    assert measure_gains(small, case.inputs, layers=["fc2"], batches=2)["fc2"] < 0.2 * g["fc2"]


def test_gains_weigh_the_budget(case, tmp_path):
    """With gains in the file each layer adds 1/2 (g e)^2; a layer of tiny gain takes the fastest format even
    at a tight target; with measured gains the target is met on the model, with faster formats than gain 1."""
    from ditq.convert.calibrate import measure_gains

    stats = R.load_calibration(case.cal)
    stats.meta["gains"] = {"inp": 1.0, "fc1": 1e-3, "fc2": 1.0, "out": 1.0}
    stats.save(tmp_path / "g.safetensors")
    p = convert_checkpoint(case.src, tmp_path / "o.safetensors", target_cos=0.9999,
                           calibration=tmp_path / "g.safetensors").precision
    by = {r["key"]: r for r in p["layers"]}
    assert by["fc1.weight"]["gain"] == 1e-3 and by["fc1.weight"]["format"] == by["fc1.weight"]["order"][0]
    assert p["estimate"] == pytest.approx(sum(0.5 * (r["gain"] * r["rel_error"]) ** 2 for r in p["layers"]))
    ref = convert_checkpoint(case.src, tmp_path / "r.safetensors", target_cos=0.9999, calibration=case.cal).precision
    assert by["fc1.weight"]["order"].index(by["fc1.weight"]["format"]) < ref["layers"][0]["order"].index(
        {r["key"]: r for r in ref["layers"]}["fc1.weight"]["format"])

    stats.meta["gains"] = measure_gains(case.model, case.inputs, batches=4)
    stats.save(tmp_path / "m.safetensors")
    for t in (0.999, 0.9999):
        dst = tmp_path / f"m{t}.safetensors"
        p = convert_checkpoint(case.src, dst, target_cos=t, calibration=tmp_path / "m.safetensors").precision
        assert p["met"] and model_cos(loaded(case, dst), case) >= t, t
        # fc1 and fc2 feed the residual stream at about a fifth of its size: gain 1 overstated their share
        base = convert_checkpoint(case.src, tmp_path / "b.safetensors", target_cos=t, calibration=case.cal).precision
        assert p["est_speed"] >= base["est_speed"], t


def test_calibrate_cli_gains(tmp_path, capsys):
    mod = tmp_path / "tiny_model.py"
    mod.write_text(
        "import torch\n"
        "def model():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 128))\n"
        "def inputs(model):\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    return iter([(torch.randn(64, 128, generator=g),) for _ in range(3)])  # read once\n")
    out = tmp_path / "cal.safetensors"
    rc = cli.main(["calibrate", f"{mod}:model", "--inputs", f"{mod}:inputs", "-o", str(out), "--dtype", "fp32",
                   "--device", "cpu", "--gains", "2"])
    assert rc == 0 and "gains of 2 layers" in capsys.readouterr().out
    stats = R.load_calibration(out)
    assert set(stats.meta["gains"]) == {"0", "2"} and stats.meta["gain_batches"] == 2
    assert stats.meta["gains"]["2"] == pytest.approx(1.0, abs=0.05) and stats.get("0").count > 0


def test_layer_no_candidate_fits_stays_float(case, tmp_path):
    p = convert_checkpoint(case.src, tmp_path / "o.safetensors", target_cos=0.99, calibration=case.cal,
                           candidates="int8-block")
    assert list(p.precision["no_candidate"]) == ["out.weight"] and "divisible by 128" in p.precision["no_candidate"]["out.weight"]
    assert {r.key: r.action for r in p.layers}["out.weight"] == "kept"
    assert all(r["format"] == "int8-block" for r in p.precision["layers"])
