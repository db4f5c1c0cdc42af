"""The mcc command as a user runs it: a real process, its exit status and its output."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import mcc

EXAMPLE = Path(__file__).parent.parent / "fixtures" / "mcc.example.toml"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcc", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_version_and_help() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mcc {mcc.__version__}"
    for cmd in (["--help"], ["serve", "--help"], ["config", "show", "--help"]):
        r = run(*cmd)
        assert r.returncode == 0 and "usage: mcc" in r.stdout


def test_bad_block_size_is_one_line_and_exit_2() -> None:
    r = run("serve", "--block-size", "1000")
    assert r.returncode == 2
    assert r.stderr == "mcc: block_size: 1000 is not a power of two between 64 KiB and 64 MiB\n"


def test_bad_flag_value_is_one_line_and_exit_2() -> None:
    r = run("serve", "--max-ranges", "many")
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "many" in r.stderr and "Traceback" not in r.stderr


def test_bad_config_file_names_each_key(tmp_path: Path) -> None:
    cfg = tmp_path / "mcc.toml"
    cfg.write_text('block_size = "3KiB"\nlisten = ["x"]\n[limits]\nmax_rangez = 3\n')
    r = run("serve", "--config", str(cfg))
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert "mcc: limits.max_rangez: unknown key" in lines
    assert any(line.startswith("mcc: listen[0]:") for line in lines)
    assert "Traceback" not in r.stderr


def test_config_show_flags_win_over_file(tmp_path: Path) -> None:
    r = run(
        "config",
        "show",
        "--config",
        str(EXAMPLE),
        "--block-size",
        "4MiB",
        "--cache-dir",
        str(tmp_path / "c1"),
        "--cache-dir",
        str(tmp_path / "c2"),
        "--max-size",
        "2GiB",
        "--canonical-host",
        "a.example=b.example",
        "--no-origin-fallback",
        "--read-timeout",
        "5s",
    )
    assert r.returncode == 0, r.stderr
    shown = tomllib.loads(r.stdout)
    assert shown["block_size"] == "4MiB"
    assert [d["path"] for d in shown["drives"]] == [str(tmp_path / "c1"), str(tmp_path / "c2")]
    assert {d["max_size"] for d in shown["drives"]} == {"2GiB"}
    assert shown["canonical_hosts"] == {"a.example": "b.example"}
    assert shown["origin_fallback"] is False
    assert shown["timeouts"]["read"] == "5s"
    assert shown["node_id"] == "edge-1"  # from the file


@pytest.mark.parametrize("flag", ["--listen", "--admin-listen"])
def test_unbindable_listener_exits_1_with_a_line(flag: str, tmp_path: Path) -> None:
    # port 1 needs privileges we do not have, or is refused as an address in use
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        args = ["serve", "--cache-dir", str(tmp_path / "c"), "--access-log", ""]
        args += [flag, f"127.0.0.1:{port}"]
        if flag == "--admin-listen":
            args += ["--listen", "127.0.0.1:0"]
        else:
            args += ["--admin-listen", "127.0.0.1:0"]
        r = run(*args)
    finally:
        s.close()
    assert r.returncode == 1
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_unusable_cache_drive_exits_1_with_a_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    r = run(
        "serve",
        "--cache-dir",
        str(not_a_dir / "cache"),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--access-log",
        "",
    )
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "cannot start" in r.stderr and str(not_a_dir) in r.stderr
