"""The conformance suite as a pytest plugin (``--mx-adapter``) and as ``mx-sim conformance``,
a thin wrapper over ``pytest.main``: the same outcomes, the same JSON report.

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
IPC_CHECKS = [c.id for c in all_checks() if c.feature == "ipc"]
# Run-dependent fields, dropped when two reports of the same run are compared.
VOLATILE = ("created_utc",)


def comparable(report: dict) -> dict:
    """The report without its timestamp and per-check durations."""
    checks = [{k: v for k, v in c.items() if k != "seconds"} for c in report["checks"]]
    return {**{k: v for k, v in report.items() if k not in VOLATILE}, "checks": checks}


def test_reference_passes_prints_table_and_writes_report(pytester):
    report = pytester.path / "out" / "report.json"
    report.parent.mkdir()
    result = pytester.runpytest_inprocess(
        f"--mx-adapter={REFERENCE}", f"--mx-report={report}", "-k", "ipc"
    )
    result.assert_outcomes(passed=len(IPC_CHECKS))
    result.stdout.fnmatch_lines(
        [
            "*mx-harness conformance, per feature*",
            "feature*passed*failed*skipped*xfailed*xpassed",
            "discovery*0*0*0*0*0",
            f"ipc*{len(IPC_CHECKS)}*0*0*0*0",
            "graphs*0*0*0*0*0",
            f"0 of {len(IPC_CHECKS)} checks failed",
            f"JSON report: {report}",
        ]
    )
    data = json.loads(report.read_text())
    assert data["ok"] and data["adapter"] == REFERENCE and data["schema_version"] == 1
    assert "shared_ipc" in data["capabilities"]  # what the adapter declares, probed once
    statuses = {c["id"]: c["status"] for c in data["checks"]}
    assert sorted(statuses) == IPC_CHECKS and set(statuses.values()) == {"passed"}


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
    others = len(IPC_CHECKS) - 3  # the abort mutant also fails ipc.abort_releases_storage
    result.assert_outcomes(
        passed=others, xfailed=1, failed=2, warnings=result.parseoutcomes()["warnings"]
    )
    result.stdout.fnmatch_lines(
        [
            "*[[]XPASS(strict)[]] claimed broken, but it passes*",
            "*'ipc.no_such_check' matches no conformance check*",
            f"ipc*{others}*1*0*1*1",  # passed failed skipped xfailed xpassed
            "XPASSED  ipc.codec_round_trip  expected to fail (claimed broken, but it passes) but passed",
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
    assert f"0 of {len(IPC_CHECKS)} checks failed" in capsys.readouterr().out
    assert json.loads(report.read_text())["ok"] is True
    assert main([*args, ABORT_MUTANT]) == 1
    out = capsys.readouterr().out
    assert "FAILED   ipc.abort_request_ids  AssertionError: abort('req-1') freed 5" in out
    assert f"2 of {len(IPC_CHECKS)} checks failed" in out
    assert main(["conformance", "--adapter", "no_colon"]) == 2
    assert "must look like pkg.module:factory" in capsys.readouterr().err


def test_a_failure_names_the_contract_sentence_and_whose_code_raised(capsys, tmp_path):
    report = tmp_path / "r.json"
    argv = ["conformance", "--adapter", ABORT_MUTANT, "-k", "abort_request_ids"]
    assert main([*argv, "--report", str(report)]) == 1
    (check,) = json.loads(report.read_text())["checks"]
    sentence = next(c.doc for c in all_checks() if c.id == "ipc.abort_request_ids")
    assert check["contract"] == sentence and check["where"].startswith("check (ipc.py:")
    out = capsys.readouterr().out
    assert f"contract: {sentence}" in out and f"raised in the {check['where']}" in out
    assert "mx-harness contract" in out  # the section under pytest's own failure report


def test_cli_passes_tb_and_junit_through_to_pytest(capsys, tmp_path):
    junit = tmp_path / "out" / "junit.xml"
    argv = ["conformance", "--adapter", ABORT_MUTANT, "-k", "abort_request_ids or codec_round"]
    assert main([*argv, "--tb", "no", "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert "= FAILURES =" not in out and "FAILED   ipc.abort_request_ids" in out
    xml = junit.read_text()
    assert 'tests="2"' in xml and 'failures="1"' in xml
    assert 'name="test_check[ipc.abort_request_ids]"' in xml


def test_cli_and_pytest_write_the_same_report(pytester, tmp_path):
    """``mx-sim conformance`` is ``pytest --mx-adapter``: equal reports but for the timestamp
    and the durations, config values with their JSON types."""
    by_cli, by_pytest = tmp_path / "cli.json", tmp_path / "pytest.json"
    keyword = "abort_request_ids or codec_round_trip or malformed_frames"
    argv = ["conformance", "--adapter", ABORT_MUTANT, "-k", keyword, "--report", str(by_cli)]
    assert main(argv) == 1
    result = pytester.runpytest_inprocess(
        f"--mx-adapter={ABORT_MUTANT}", f"--mx-report={by_pytest}", "-k", keyword
    )
    result.assert_outcomes(passed=2, failed=1)
    cli, plain = (json.loads(p.read_text()) for p in (by_cli, by_pytest))
    assert comparable(cli) == comparable(plain)
    assert cli["config"] == {
        "adapter": ABORT_MUTANT,
        "keyword": keyword,
        "xfails_file": None,
        "xdist_workers": 0,
    }
    assert cli["versions"]["mx-harness"] and cli["versions"]["torch"]
    assert cli["created_utc"].endswith("+00:00")
    assert all(isinstance(c["seconds"], float) for c in cli["checks"])


def test_in_process_run_checks_goes_through_pytest(tmp_path):
    from mx_sim.conformance.adapters import reference_adapter
    from mx_sim.conformance.run_checks import run_checks

    xfails = tmp_path / "known.txt"
    xfails.write_text("ipc.codec_round_trip: claimed broken\n")
    report = run_checks(reference_adapter, name="ref", keyword="ipc.", xfails=xfails)
    statuses = {r.id: r.status for r in report.results}
    assert sorted(statuses) == IPC_CHECKS and statuses["ipc.codec_round_trip"] == "xpassed"
    assert report.failed_ids() == ["ipc.codec_round_trip"] and report.config["adapter"] == "ref"
    with pytest.raises(ValueError, match="the factory returned NoneType"):
        run_checks(lambda: None)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_the_json_report_is_whole_under_xdist(tmp_path):
    """``-n 2``: the checks run in workers, the report is written once, by the controller, with
    every check's outcome (it used to say ``"ok": true`` with no checks while one failed);
    ``mx-sim conformance -n 2`` writes the same report."""
    import os
    import subprocess
    from pathlib import Path

    report, by_cli = tmp_path / "r.json", tmp_path / "cli.json"
    tests_dir = str(Path(__file__).parents[2])
    keyword = "abort_request_ids or codec_round_trip or malformed_frames"
    env = dict(os.environ, PYTHONPATH=tests_dir)
    commands = {
        report: [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q",
                 f"--mx-adapter={ABORT_MUTANT}", f"--mx-report={report}", "-k", keyword],
        by_cli: [sys.executable, "-m", "mx_sim.cli", "conformance", "-n", "2",
                 "--adapter", ABORT_MUTANT, "--report", str(by_cli), "-k", keyword],
    }  # fmt: skip
    for cmd in commands.values():
        done = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100
        )
        assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
        assert done.stdout.count("mx-harness conformance, per feature") == 1, done.stdout[-2000:]
    data = json.loads(report.read_text())
    assert comparable(json.loads(by_cli.read_text())) == comparable(data)
    statuses = {c["id"]: c["status"] for c in data["checks"]}
    assert data["ok"] is False and len(statuses) == 3, statuses
    assert "failed" in statuses.values() and "passed" in statuses.values()
    assert data["schema_version"] == 1 and data["capabilities"]
    assert data["config"]["xdist_workers"] == 2  # an int, not "2"
    failed = next(c for c in data["checks"] if c["status"] == "failed")
    assert failed["contract"] and failed["where"].startswith("check (")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("raises_on_import", "importing 'broken_adapter' raised RuntimeError: no GPU driver"),
        ("returns_none", "the factory returned NoneType, not an engine adapter"),
        ("report_under_a_file", "report "),
        ("missing_xfails", "expected-failures file"),
        ("junit_under_a_file", "--junit "),
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
    if setup in ("report_under_a_file", "missing_xfails", "junit_under_a_file"):
        argv[2] = "mx_sim.conformance.adapters:reference_adapter"
        (tmp_path / "a_file").write_text("")
    if setup == "report_under_a_file":
        argv += ["--report", str(tmp_path / "a_file" / "r.json")]
    if setup == "missing_xfails":
        argv += ["--xfail", str(tmp_path / "no_such_file.txt")]
    if setup == "junit_under_a_file":
        argv += ["--junit", str(tmp_path / "a_file" / "j.xml")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""  # no check ran


def test_a_keyword_selecting_no_check_is_a_usage_error(capsys):
    assert main(["conformance", "--adapter", REFERENCE, "-k", "no_such_check"]) == 2
    err = capsys.readouterr().err
    assert err == "mx-sim: error: -k 'no_such_check' selects no conformance check\n"


def test_an_unwritable_run_out_is_found_before_anything_runs(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    rc = main(["run", "--scenarios", "discovery", "--out", str(tmp_path / "a_file" / "out")])
    captured = capsys.readouterr()
    assert rc == 2 and "--out" in captured.err and captured.out == "", captured
