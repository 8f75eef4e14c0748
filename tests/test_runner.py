"""``labkit run``: labs run headless, the report shows records and plots, failures name the cell."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit.course.kernels import prepare_kernel
from labkit.course.runner import lab_params, parse_params, run_labs


def _lab(path: Path, *cells: str) -> Path:
    params = new_code_cell('PROFILE = "auto"\nMAX_TOKENS = 8')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell(f"# {path.stem}"), params,
                             *[new_code_cell(c) for c in cells]])
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two labs run by ``run_labs`` (a kernel each): the tests that use it are slow."""
    tmp = tmp_path_factory.mktemp("labs")
    plot = _lab(tmp / "01_plot.ipynb",
                "import labkit\nlabkit.record('tokens', MAX_TOKENS * 2)",
                "labkit.claim('tokens are doubled', MAX_TOKENS * 2 == -2, f'{MAX_TOKENS * 2}')\n"
                "labkit.claim('tokens are positive', MAX_TOKENS > 0, f'MAX_TOKENS={MAX_TOKENS}',"
                " otherwise='the run set it to -1')",
                "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()")
    check = _lab(tmp / "02_check.ipynb",
                 "x = 1",
                 "if MAX_TOKENS < 1:\n"
                 "    raise ValueError(f'MAX_TOKENS must be >= 1, got {MAX_TOKENS}')")
    lines: list[str] = []
    result = run_labs([str(plot), str(check)], profile="ci", params={"MAX_TOKENS": -1},
                      out_dir=tmp / "run", timeout_s=60, progress=lines.append)
    result.progress_lines = lines
    return result


@pytest.mark.slow
def test_one_progress_line_per_lab_as_it_ends(run):
    """What make lab prints: a line per lab with its status, minutes and key claims."""
    first, second = run.progress_lines
    assert first.startswith("01_plot.ipynb: ok in 0.") and first.endswith("key claims 1/2 held")
    assert second.startswith("02_check.ipynb: failed in ")
    assert second.endswith("key claims 0/0 held; stopped at cell 3: ValueError: MAX_TOKENS must "
                           "be >= 1, got -1")


@pytest.mark.slow
def test_a_bad_parameter_fails_the_run_naming_notebook_and_cell(run):
    assert not run.ok
    first, second = run.labs
    assert first.status == "ok" and second.status == "failed"
    assert second.failure.cell_index == 3 and "MAX_TOKENS" in second.failure.source
    assert "02_check.ipynb failed at cell 3: ValueError: MAX_TOKENS must be >= 1, got -1" \
        in run.failure_message()


@pytest.mark.slow
def test_report_is_self_contained_with_records_and_plots(run):
    html = run.report.read_text()
    assert "tokens" in html and "<td>-2</td>" in html  # the record table of 01_plot
    assert "data:image/png;base64,iVBOR" in html       # the plot, embedded
    assert "MAX_TOKENS must be &gt;= 1" in html and "02_check.ipynb" in html
    assert "<script" not in html and "src='http" not in html


@pytest.mark.slow
def test_claims_reach_summary_and_report_with_verdict_and_evidence(run):
    summary = json.loads(run.summary.read_text())
    claims = summary["labs"][0]["claims"]
    assert [(c["text"], c["holds"], c["evidence"]) for c in claims] == [
        ("tokens are doubled", True, "-2"), ("tokens are positive", False, "MAX_TOKENS=-1")]
    assert summary["labs"][1]["claims"] == []
    html = run.report.read_text()
    assert "claims: 1 of 2 hold" in html and "tokens are positive" in html


@pytest.mark.slow
def test_summary_json_lists_each_lab_with_records_and_versions(run):
    summary = json.loads(run.summary.read_text())
    assert summary["ok"] is False and summary["params"] == {"PROFILE": "ci", "MAX_TOKENS": -1}
    assert {"python", "torch", "transformers", "vllm"} <= set(summary["versions"])
    assert summary["labs"][0]["records"] == {"tokens": -2} and summary["labs"][0]["plots"] == 1
    assert summary["labs"][1]["failure"]["cell_index"] == 3
    assert (run.out_dir / "01_plot.ipynb").is_file()


def test_parse_params_reads_json_then_python_literals_then_text():
    assert parse_params(["MAX_TOKENS=-1", "ENGINE=hf", "RATE=0.5", "SIZES=[1, 2]",
                         "FLAG=true", "X=None", "NAME=a=b"]) == {
        "MAX_TOKENS": -1, "ENGINE": "hf", "RATE": 0.5, "SIZES": [1, 2], "FLAG": True,
        "X": None, "NAME": "a=b"}
    with pytest.raises(ValueError, match="bad parameter 'MAX_TOKENS'; write NAME=VALUE"):
        parse_params(["MAX_TOKENS"])


def test_a_parameter_can_be_given_to_one_lab():
    params = parse_params(["MODEL=smollm2-135m", "01:MODEL=synthetic-8b", "02:REPEATS=3"])
    assert params == {"MODEL": "smollm2-135m", "01:MODEL": "synthetic-8b", "02:REPEATS": 3}
    assert lab_params(params, "notebooks/01_profiling.ipynb") == {"MODEL": "synthetic-8b"}
    assert lab_params(params, "02_batching.ipynb") == {"MODEL": "smollm2-135m", "REPEATS": 3}
    assert lab_params(params, "03_caching.ipynb") == {"MODEL": "smollm2-135m"}
    for bad in ("1:MODEL=x", "ab:MODEL=x", "01:=x"):
        with pytest.raises(ValueError, match="NN:NAME=VALUE"):
            parse_params([bad])


def test_kernel_points_at_this_python_even_with_an_unwritable_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/nonexistent")
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
                "MPLCONFIGDIR", "JUPYTER_PATH"):
        monkeypatch.delenv(var, raising=False)
    name = prepare_kernel()
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(name)
    assert spec.argv[0] == sys.executable
    assert spec.env["MPLBACKEND"].endswith("backend_inline")


@pytest.mark.slow
def test_gpus_run_labs_side_by_side_one_gpu_each_and_all_gpu_labs_alone(tmp_path, monkeypatch):
    stamp = ("import os, time, labkit\n"
             "labkit.record('visible', os.environ.get('CUDA_VISIBLE_DEVICES'))\n"
             "labkit.record('cwd', os.getcwd())\n"
             "labkit.record('t0', time.time())\n"
             "time.sleep(4)\n"
             "labkit.record('t1', time.time())")
    a = _lab(tmp_path / "01_a.ipynb", stamp)
    b = _lab(tmp_path / "02_b.ipynb", stamp)
    both = _lab(tmp_path / "03_both.ipynb", stamp)
    nb = nbformat.read(both, as_version=4)
    nb.metadata["labkit"] = {"gpus": "all"}
    nbformat.write(nb, both)
    chdirs: list[str] = []
    monkeypatch.setattr(os, "chdir", lambda path: chdirs.append(str(path)))
    result = run_labs([str(a), str(b), str(both)], profile="ci", out_dir=tmp_path / "run",
                      timeout_s=60, gpus="0,1")
    assert result.ok, result.failure_message()
    # Each kernel starts in its notebook's folder, and this process never leaves its own cwd:
    # two lab threads each doing chdir-and-restore leave the process in one lab's folder.
    # (papermill's file I/O re-enters the current folder around each read/write; harmless.)
    assert set(chdirs) <= {os.getcwd()}
    ra, rb, rboth = (lab.records for lab in result.labs)
    assert {ra["cwd"], rb["cwd"], rboth["cwd"]} == {str(tmp_path)}
    assert {ra["visible"], rb["visible"]} == {"0", "1"} and rboth["visible"] == "0,1"
    assert ra["t0"] < rb["t1"] and rb["t0"] < ra["t1"]            # the two overlapped
    assert rboth["t0"] > max(ra["t1"], rb["t1"])                  # the all-GPU lab ran alone
    assert [lab.gpus for lab in result.labs] == [ra["visible"], rb["visible"], "0,1"]
    assert json.loads(result.summary.read_text())["gpus"] == ["0", "1"]


@pytest.mark.parametrize("spec", ["0,x", "1,1", "-1"])
def test_bad_gpu_list_names_the_value(spec):
    with pytest.raises(ValueError, match=f"bad GPU list '{spec}': give distinct device indices"):
        run_labs([], gpus=spec)


@pytest.mark.slow
def test_a_lab_kernel_talks_over_private_ipc_sockets_and_leaves_nothing(tmp_path, capfd):
    """No TCP port on the loopback (and no ipykernel warning about one per kernel in make lab):
    the kernel's sockets live in a 0700 temp folder that is gone when the run ends."""
    import tempfile

    from labkit.course.runner import execute

    before = set(Path(tempfile.gettempdir()).glob("lk-*"))
    lab = _lab(tmp_path / "ipc.ipynb",
               "from ipykernel.kernelapp import IPKernelApp\nimport os, stat\n"
               "app = IPKernelApp.instance()\n"
               "folder = os.path.dirname(app.ip)\n"
               "print(app.transport, oct(os.stat(folder).st_mode & 0o777), folder)")
    ex = execute(lab, tmp_path / "out.ipynb", parameters={}, cwd=tmp_path)
    assert ex.ok, ex.failure
    text = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs[0]["text"]
    transport, mode, folder = text.split()
    assert (transport, mode) == ("ipc", "0o700")
    assert not Path(folder).exists() and set(Path(tempfile.gettempdir()).glob("lk-*")) <= before
    assert "without encryption" not in capfd.readouterr().err
