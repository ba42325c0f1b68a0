"""The shared check of a refused command (exit 2, one `error:` line, no traceback) and the
job file such a command is given."""

from pathlib import Path

import yaml
from conftest import tiny_job

from runner.cli.main import main


def run_cli(args, capsys):
    """(exit code, stderr stripped, stdout) of `cascade ARGS` run in this process."""
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out


def one_line_error(code, err, *expected):
    """Exit 2 and an `error:` line without a traceback that contains every `expected` text."""
    assert code == 2, err
    assert err.startswith("error:") and "Traceback" not in err, err
    for words in expected:
        assert words in err, err


def write_job(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(tiny_job(**overrides)))
    return path
