"""groupnorm bench without a GPU: its shape table, its bytes formula, its refusal."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from groupnorm import bench, cli


def test_shape_table_is_spec_table():
    """Every row of docs/spec.md#benchmark-shapes, multi-value rows expanded: 21 shapes, each G
    dividing C."""
    assert len(bench.SHAPES) == 21
    assert len({s.workload for s in bench.SHAPES}) == 21
    dims = {(s.dims, s.G, s.dtype) for s in bench.SHAPES}
    bf16 = torch.bfloat16
    for expected in [
        ((2, 320, 64, 64), 32, bf16),
        ((1, 128, 1024, 1024), 32, bf16),
        ((1, 128, 20, 256, 256), 32, bf16),
        ((2, 2048, 25, 38), 32, bf16),
        ((32, 256, 56, 56), 32, torch.float32),
        ((2, 32, 128, 128, 128), 8, bf16),
        ((8, 512, 1024), 32, bf16),
        ((2, 960, 64, 64), 32, bf16),
    ]:
        assert expected in dims, f"missing benchmark shape {expected}"
    assert all(s.C % s.G == 0 for s in bench.SHAPES)


def test_bytes_formula_gives_the_spec_floors():
    """docs/spec.md#performance-floors at 3.0 TB/s: VAE 1x128x512x512 forward 45 us, 3-D
    2x32x128^3 forward 0.18 ms. Forward moves 2 bf16 tensors, forward+backward 5."""
    shapes = {s.workload: s for s in bench.SHAPES}
    vae, seg = shapes["VAE 512px 512^2"], shapes["3-D segmentation"]
    assert bench.bytes_moved(vae, "fwd") == 2 * 2 * 128 * 512 * 512
    assert bench.bytes_moved(vae, "fwd") / 3.0e12 == pytest.approx(44.7e-6, rel=1e-3)
    assert bench.bytes_moved(seg, "fwd") / 3.0e12 == pytest.approx(179e-6, rel=1e-3)
    assert bench.bytes_moved(seg, "fwd+bwd") == 5 * seg.nbytes
    fp32 = shapes["ResNet training b32 fp32"]
    assert fp32.nbytes == 4 * 32 * 256 * 56 * 56


@pytest.mark.parametrize(
    "dims", [(2, 6, 5), (2, 6, 4, 5), (1, 6, 2, 3, 4)], ids=["ncl", "nchw-4d", "ncdhw-5d"]
)
def test_make_input_layouts(dims):
    shape = bench.Shape("t", dims[0], dims[1], dims[2:], G=3, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    assert bench.make_input(shape, "nchw", "cpu", gen).is_contiguous()
    x = bench.make_input(shape, "channels_last", "cpu", gen)
    assert x.shape == dims and x.stride(1) == 1 and x.stride(0) == x.numel() // dims[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(capsys):
    assert cli.main(["bench", "--shapes", "VAE"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layouts", "bogus"], "--layouts must be a comma list"),
        (["--providers", ""], "--providers must be a comma list"),
        (["--shapes", "zzz"], "no workload name contains 'zzz'"),
        (["--warm", "2/1"], "--warm must be I/N"),
    ],
)
def test_regression_bench_refuses_bad_arguments_with_status_2_before_asking_for_cuda(
    args, message, capsys
):
    """Bad arguments were checked only after the CUDA check, and with exit status 1, which
    says that one of our cases failed its correctness check."""
    assert cli.main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert f"groupnorm bench: error: {message}" in err and "CUDA" not in err


@pytest.mark.parametrize("reps", ["0", "1", "-3"])
def test_regression_bench_needs_two_repetitions(reps, capsys):
    """--reps 0 or 1 passed, and the timing's quantiles would then raise on a GPU."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--reps", reps])
    assert exit_.value.code == 2
    assert "--reps: must be at least 2" in capsys.readouterr().err


def _cpu_timer(fn, graph, reps):
    fn()
    return 1e-6, 1e-6, 1e-6


def test_a_wrong_provider_is_a_failed_row_and_exit_status_1(tmp_path, capsys):
    """Ours gated by its correctness check: a wrong result is recorded, not timed, and the
    command's exit status says so; another provider failing does not change the status."""
    shape = bench.Shape("tiny", 2, 8, (3, 5), G=4, dtype=torch.float32)

    def wrong():
        return lambda x, w, b, G: torch.nn.functional.group_norm(x, G, w, b) + 1e-2

    providers = [
        bench.Provider("ours", "group", wrong),
        bench.Provider("torch", "group", bench._torch),
    ]
    handed = []
    rows = bench.run(
        [shape],
        ["nchw"],
        ["fwd"],
        providers,
        timer=_cpu_timer,
        device="cpu",
        reps=1,
        copy_bw=1e9,
        echo=lambda line: None,
        on_row=handed.append,
    )
    assert handed == rows
    assert [r["provider"] for r in bench.failures(rows)] == ["ours"]
    assert "wrong output" in rows[0]["error"] and "median_us" not in rows[0]
    meta = bench.environment("bench-test")
    assert bench.finish(tmp_path, meta, rows) == 1
    assert "ours failed tiny nchw fwd" in capsys.readouterr().err
    assert (
        bench.finish(tmp_path, meta, [rows[1], {**rows[1], "provider": "liger", "error": "x"}]) == 0
    )


def test_result_files_carry_benchmark_machine_and_time_and_never_overwrite(tmp_path):
    meta = bench.environment("cpu_demo")
    first = bench.save_results(tmp_path, meta, [{"a": 1}])
    second = bench.save_results(tmp_path, meta, [{"a": 2}])
    stamp = meta["date"][:10].replace("-", "")
    assert first != second and first.exists() and second.exists()
    for path in (first, second):
        assert path.name.startswith("cpu_demo-") and stamp in path.name
        assert f"{meta['cpu_count']}cores-{meta['torch_threads']}threads" in path.name
    assert second.name == first.name.replace(".json", "-2.json")


def test_result_files_name_the_cpu_model(tmp_path, monkeypatch):
    """The session machines change (AMD EPYC, Intel Xeon) while the file names say only
    x86-64 and the core count: the metadata names the model, read from /proc/cpuinfo."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU 9000\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k),
    )
    assert bench.environment("cpu_demo")["cpu_model"] == "Example CPU 9000"


def test_a_result_file_is_rewritten_in_place_as_rows_arrive(tmp_path):
    """The GPU bench saves after every row: a run stopped by a time limit keeps its rows."""
    meta = bench.environment("cpu_demo")
    path = bench.save_results(tmp_path, meta, [])
    assert bench.save_results(tmp_path, meta, [{"a": 1}], path) == path
    assert json.loads(path.read_text())["rows"] == [{"a": 1}]
    assert len(list(tmp_path.iterdir())) == 1


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _benchmark_module(name: str, monkeypatch: pytest.MonkeyPatch):
    """benchmarks/<name>.py imported as a module (its directory on sys.path, as when run)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_benchmark_script_imports(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: three scripts imported a helper that had moved, and failed before measuring."""
    _benchmark_module(script, monkeypatch)


def test_warm_runs_ours_untimed_on_its_share_of_the_shapes(monkeypatch, capsys):
    """``bench --warm I/N``: ours on shapes[I::N] only, every layout and direction, nothing
    timed or saved; a wrong result still fails (exit status 1, the case named)."""
    seen = []

    def ours(offset: float):
        def build():
            def f(x, w, b, G):
                seen.append(tuple(x.shape))
                return torch.nn.functional.group_norm(x, G, w, b) + offset

            return f

        return build

    shapes = [bench.Shape(f"tiny{i}", 2, 8, (3, i + 2), G=4, dtype=torch.float32) for i in range(3)]
    monkeypatch.setattr(bench, "PROVIDERS", [bench.Provider("ours", "group", ours(0.0))])
    cpu = torch.device("cpu")
    assert bench._warm((1, 2), shapes, bench.LAYOUTS, bench.DIRECTIONS, cpu) == 0
    assert set(seen) == {(2, 8, 3, 3)}
    monkeypatch.setattr(bench, "PROVIDERS", [bench.Provider("ours", "group", ours(1e-2))])
    assert bench._warm((0, 3), shapes, ["nchw"], ["fwd"], cpu) == 1
    assert "ours failed tiny0 nchw fwd: wrong output" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["3/3", "1", "a/2", "-1/2", "1/2/3"])
def test_warm_share_must_be_i_of_n(bad):
    with pytest.raises(ValueError, match="--warm must be I/N"):
        bench._share(bad)
    assert bench._share("2/8") == (2, 8)


def test_model_fit_recovers_the_constants_that_made_its_measurements(tmp_path, monkeypatch, capsys):
    """The performance model's least squares: bench rows synthesized from known constants (NCHW
    and channels-last, as a bench file holds them) give those constants back, and --compare
    then flags nothing."""
    model = _benchmark_module("model", monkeypatch)
    truth = model.Fit(call_us=3.5, launch_us=2.25, eta_fwd=0.62, eta_bwd=0.81)
    rows = [
        {
            "workload": r.workload,
            "layout": r.layout,
            "direction": r.direction,
            "provider": "ours",
            "median_us": r.model_us,
        }
        for r in model.model("h200", truth)
        if r.forward == "auto"
    ]
    path = tmp_path / "bench-synthetic.json"
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    monkeypatch.setattr(model, "FIT_FILE", path)
    fit = model.fit_constants()
    assert fit.eta_fwd == truth.eta_fwd and fit.eta_bwd == truth.eta_bwd
    assert fit.call_us == pytest.approx(truth.call_us) and fit.launch_us == pytest.approx(2.25)
    monkeypatch.setattr(sys, "argv", ["model.py", "--device", "h200", "--compare", str(path)])
    assert model.main() == 0
    out = capsys.readouterr().out
    assert "nchw (fitted to): 0 of 42 rows off" in out
    assert "channels_last (predicted): 0 of 42 rows off" in out


def _not_timed(*args, **kwargs):
    raise AssertionError("timed before its arguments were checked")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "{tmp}/file/x"], "argument --out: cannot write files in {tmp}/file/x: Not a"),
        (["--out", "{tmp}/file"], "argument --out: {tmp}/file is a file, not a folder"),
        (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
        (["--threads", "-1"], "argument --threads: expected an integer >= 1, got -1"),
        (["--threads", "two"], "argument --threads: expected an integer, got 'two'"),
    ],
)
@pytest.mark.parametrize("entry", ["small_input_args", "main"])
def test_regression_benchmark_arguments_are_refused_before_any_timing(
    entry, argv, message, tmp_path, monkeypatch, capsys
):
    """`cpu_fused_cl.py --out /etc/passwd/x` ran every timing, printed its table, then died with
    NotADirectoryError and saved nothing (every script saving through cpu_standard.save);
    --threads 0 or -1 gave a RuntimeError traceback from torch.set_num_threads. The scripts
    parse with cpu_standard.small_input_args, cpu_standard.py itself with its main."""
    (tmp_path / "file").write_text("")
    module = _benchmark_module("cpu_standard", monkeypatch)
    monkeypatch.setattr(module, "run", _not_timed)
    monkeypatch.setattr(sys, "argv", ["script.py", *(a.format(tmp=tmp_path) for a in argv)])
    if entry == "main":  # cpu_standard.py's --threads 0 means torch's default: it times
        if argv == ["--threads", "0"]:
            with pytest.raises(AssertionError, match="timed before"):
                module.main()
            return
        message = message.replace(">= 1", ">= 0")
    with pytest.raises(SystemExit) as stop:
        module.small_input_args("doc") if entry == "small_input_args" else module.main()
    assert stop.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("compare", "message"),
    [
        ("{tmp}/none.json", "cannot read {tmp}/none.json: No such file or directory"),
        ("{tmp}/README.md", "{tmp}/README.md holds no timed rows of ours"),
        ("{tmp}/other.json", "{tmp}/other.json holds no timed rows of ours"),
    ],
)
def test_regression_model_compare_refuses_a_file_that_is_not_a_bench_result(
    compare, message, tmp_path, monkeypatch, capsys
):
    """`model.py --compare /nonexistent.json` and `--compare README.md` gave a FileNotFoundError
    and a JSONDecodeError traceback, after the model's tables."""
    (tmp_path / "README.md").write_text("# not JSON\n")
    (tmp_path / "other.json").write_text(json.dumps({"meta": {}, "rows": [{"ours_us": 1.0}]}))
    model = _benchmark_module("model", monkeypatch)
    monkeypatch.setattr(model, "fit_constants", _not_timed)
    monkeypatch.setattr(sys, "argv", ["model.py", "--compare", compare.format(tmp=tmp_path)])
    with pytest.raises(SystemExit) as stop:
        model.main()
    assert stop.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_regression_model_json_refuses_a_folder(tmp_path, monkeypatch, capsys):
    """`model.py --json benchmarks` (a folder) printed every table, then failed writing it with
    IsADirectoryError: only the folder above it was checked."""
    model = _benchmark_module("model", monkeypatch)
    monkeypatch.setattr(model, "fit_constants", _not_timed)
    monkeypatch.setattr(sys, "argv", ["model.py", "--json", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        model.main()
    assert stop.value.code == 2
    assert f"{tmp_path} is a folder: give a file name" in capsys.readouterr().err


def test_regression_model_compare_refused_a_wave_only_bench_file(tmp_path, monkeypatch, capsys):
    """`model.py --compare benchmarks/results/bench-nvidia-h200-20261204T131058Z.json` (83 rows,
    all of provider ours-wave: a bench run of the wave regime alone) was refused as holding "no
    timed rows of ours", though the model has wave rows to set beside them. ours-wave rows are
    now compared with the wave regime's, and a file with neither provider is refused by name."""
    model = _benchmark_module("model", monkeypatch)
    fit = model.Fit(call_us=3.5, launch_us=2.25, eta_fwd=0.62, eta_bwd=0.81)
    monkeypatch.setattr(model, "fit_constants", lambda: fit)
    wave = [r for r in model.model("h200", fit) if r.forward == "wave"]
    assert wave, "the model has no wave rows to compare"
    rows = [
        {
            "workload": r.workload,
            "layout": r.layout,
            "direction": r.direction,
            "provider": "ours-wave",
            "median_us": r.model_us,
        }
        for r in wave
    ]
    path = tmp_path / "bench-wave.json"
    path.write_text(json.dumps({"meta": {"device": "NVIDIA H200"}, "rows": rows}))
    monkeypatch.setattr(sys, "argv", ["model.py", "--device", "h200", "--compare", str(path)])
    assert model.main() == 0
    out = capsys.readouterr().out
    assert "MODEL (wave) vs MEASURED (bench-wave.json; ours-wave;" in out
    assert "MODEL (auto) vs MEASURED" not in out
    nchw = sum(r.layout == "nchw" for r in wave)
    assert f"nchw (predicted): 0 of {nchw} rows off by > 20 %" in out

    other = tmp_path / "bench-torch.json"
    other.write_text(json.dumps({"meta": {}, "rows": [{**rows[0], "provider": "torch"}]}))
    monkeypatch.setattr(sys, "argv", ["model.py", "--compare", str(other)])
    with pytest.raises(SystemExit) as stop:
        model.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"{other} holds no timed rows of ours (providers ours, ours-wave)" in err
