"""The conformance suite as a pytest plugin (``--mx-adapter``) and as ``mx-sim conformance``.

Each pytester run is a whole in-process pytest session, so there are few, narrowed with ``-k``
to checks that build no HF model: an in-process run drops the modules it imported, and
``transformers``' lazy submodules do not survive that.
"""

from __future__ import annotations

import json
import sys

import pytest

from mx_sim.cli import main
from mx_sim.conformance.catalog import all_checks

pytest_plugins = ["pytester"]

# Register the checks before any pytester run: an in-process run drops the modules it imported,
# and a registry imported afresh would not see check modules its package still holds.
all_checks()

REFERENCE = "mx_sim.conformance.adapters:reference_adapter"
ABORT_MUTANT = "mutants.ipc_abort_string_iterated:factory"


def test_reference_passes_prints_table_and_writes_report(pytester):
    report = pytester.path / "out" / "report.json"
    report.parent.mkdir()
    result = pytester.runpytest_inprocess(
        f"--mx-adapter={REFERENCE}", f"--mx-report={report}", "-k", "ipc"
    )
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(
        [
            "*mx-harness conformance, per feature*",
            "feature*passed*failed*skipped*xfailed*xpassed",
            "discovery*0*0*0*0*0",
            "ipc*7*0*0*0*0",
            "graphs*0*0*0*0*0",
            f"JSON report: {report}",
        ]
    )
    data = json.loads(report.read_text())
    assert data["ok"] and data["adapter"] == REFERENCE
    statuses = {c["id"]: c["status"] for c in data["checks"]}
    assert len(statuses) == 7 and set(statuses.values()) == {"passed"}
    assert statuses["ipc.abort_request_ids"] == "passed"


def test_adapter_from_environment(pytester, monkeypatch):
    monkeypatch.setenv("MX_ADAPTER", ABORT_MUTANT)
    result = pytester.runpytest_inprocess("-k", "abort_request_ids")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*abort('req-1') freed 5 tensors (4 left)*a str is one request id*"]
    )


def test_expected_failures_file(pytester):
    xfails = pytester.makefile(
        ".txt",
        xfails="\n".join(
            [
                "# our abort is known broken",
                "ipc.abort_request_ids: vLLM #32104 not fixed here yet",
                "ipc.codec_round_trip: claimed broken, but it passes",  # strict: XPASS fails
                "ipc.no_such_check: renamed long ago",  # stale: warns
            ]
        ),
    )
    result = pytester.runpytest_inprocess(
        f"--mx-adapter={ABORT_MUTANT}", f"--mx-xfails={xfails}", "-k", "ipc", "-rxX"
    )
    result.assert_outcomes(
        passed=5, xfailed=1, failed=1, warnings=result.parseoutcomes()["warnings"]
    )
    result.stdout.fnmatch_lines(
        [
            "*[[]XPASS(strict)[]] claimed broken, but it passes*",
            "*'ipc.no_such_check' matches no conformance check*",
            "ipc*5*0*0*1*1",  # passed failed skipped xfailed xpassed: as mx-sim conformance counts
            "*XFAIL*ipc.abort_request_ids*vLLM #32104 not fixed here yet*",
        ]
    )


def test_undeclared_capability_is_skipped_with_its_reason(pytester):
    pytester.makepyfile(
        partial_adapter="""
        from mx_reference import adapter as caps
        from mx_sim.conformance.adapters import ReferenceAdapter
        from mx_sim.cpu_mock import CpuMockBackend

        class NoGraphs(ReferenceAdapter):
            capabilities = caps.CAPABILITIES - {caps.CUDA_GRAPHS}

        def factory():
            return NoGraphs(CpuMockBackend())
        """
    )
    pytester.syspathinsert()
    result = pytester.runpytest_inprocess(
        "--mx-adapter=partial_adapter:factory", "-k", "graphs", "-rs"
    )
    result.assert_outcomes(skipped=4)
    result.stdout.fnmatch_lines(["*SKIPPED*adapter does not declare capability cuda_graphs*"])


def test_bad_adapter_spec_is_one_usage_error(pytester):
    result = pytester.runpytest_inprocess("--mx-adapter=no_such_module:factory")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if "no_such_module" in line]
    assert errors == [
        "ERROR: adapter spec 'no_such_module:factory': cannot import 'no_such_module' "
        "(No module named 'no_such_module')"
    ]


def test_cli_exit_status_reference_zero_mutant_one(capsys, tmp_path):
    report = tmp_path / "r.json"
    args = ["conformance", "-k", "ipc.", "--report", str(report), "--adapter"]
    assert main([*args, REFERENCE]) == 0
    assert "0 of 7 checks failed" in capsys.readouterr().out
    assert json.loads(report.read_text())["ok"] is True
    assert main([*args, ABORT_MUTANT]) == 1
    out = capsys.readouterr().out
    assert "FAILED   ipc.abort_request_ids" in out and "1 of 7 checks failed" in out
    assert main(["conformance", "--adapter", "no_colon"]) == 2
    assert "must look like pkg.module:factory" in capsys.readouterr().err


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_the_json_report_is_whole_under_xdist(tmp_path):
    """``-n 2``: the checks run in workers, the report is written once, by the controller, with
    every check's outcome (it used to say ``"ok": true`` with no checks while one failed)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    report = tmp_path / "r.json"
    tests_dir = str(Path(__file__).parents[2])
    cmd = [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q",
           f"--mx-adapter={ABORT_MUTANT}", f"--mx-report={report}", "-k", "abort_request_ids or codec_round_trip or malformed_frames"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=tests_dir)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 1, done.stdout[-2000:]
    data = json.loads(report.read_text())
    statuses = {c["id"]: c["status"] for c in data["checks"]}
    assert data["ok"] is False and len(statuses) == 3, statuses
    assert "failed" in statuses.values() and "passed" in statuses.values()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("raises_on_import", "importing 'broken_adapter' raised RuntimeError: no GPU driver"),
        ("returns_none", "the factory returned NoneType, not an engine adapter"),
        ("report_under_a_file", "report "),
        ("missing_xfails", "expected-failures file"),
    ],
)
def test_every_non_check_failure_is_one_line_exit_2_before_any_check(
    setup, message, tmp_path, monkeypatch, capsys
):
    (tmp_path / "broken_adapter.py").write_text(
        "raise RuntimeError('no GPU driver')\n" if setup == "raises_on_import" else
        "def factory():\n    return None\n"
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_adapter", raising=False)
    spec = "broken_adapter:factory"
    argv = ["conformance", "--adapter", spec]
    if setup in ("report_under_a_file", "missing_xfails"):
        argv[2] = "mx_sim.conformance.adapters:reference_adapter"
        (tmp_path / "a_file").write_text("")
    if setup == "report_under_a_file":
        argv += ["--report", str(tmp_path / "a_file" / "r.json")]
    if setup == "missing_xfails":
        argv += ["--xfail", str(tmp_path / "no_such_file.txt")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""  # no check ran


def test_an_unwritable_run_out_is_found_before_anything_runs(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    rc = main(["run", "--scenarios", "discovery", "--out", str(tmp_path / "a_file" / "out")])
    captured = capsys.readouterr()
    assert rc == 2 and "--out" in captured.err and captured.out == "", captured
