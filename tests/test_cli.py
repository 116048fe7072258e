import subprocess
import sys

from ccmr_core.cli import main


def test_help_explains_each_command(capsys):
    for cmd in ("synth", "ingest"):
        try:
            main([cmd, "--help"])
        except SystemExit as e:
            assert e.code == 0
        out = capsys.readouterr().out
        assert "--out" in out and len(out) > 300


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "ccmr_core.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "synth" in r.stdout and "ingest" in r.stdout


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err
    assert main(["synth", "--out", str(tmp_path / "x"), "--set", "data.synth.sites=0"]) == 2
    assert "data.synth.sites" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_synth_then_ingest(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "coh"), "--sites", "1", "--patients", "2", "--quiet"]) == 0
    assert "site-a: 2 patients" in capsys.readouterr().out
    assert main(["ingest", str(tmp_path / "coh" / "site-a"), "--out", str(tmp_path / "c"), "--preset", "smoke",
                 "--quiet"]) == 0
    assert "2 usable studies" in capsys.readouterr().out
