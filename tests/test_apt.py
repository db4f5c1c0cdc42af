"""Real ``apt-get`` through mcc against a tiny flat repository on the test origin.

Regression: fetching the same ``.deb`` again through mcc was a round trip
(``fwd=stale; fwd-status=304``): Debian mirrors send no Cache-Control, Expires or
validators on package files, and RFC 9111's heuristic made them stale at once.

apt runs with ``APT_CONFIG`` and ``-o Dir::...`` options pointing into the test's temp
folder, so the machine's apt configuration, lists and caches are neither read nor
touched.
"""

from __future__ import annotations

import email.utils
import hashlib
import shutil
import time
from pathlib import Path

import pytest
import trio

from fixtures.origin import Origin
from tests.helpers import run_node

pytestmark = pytest.mark.tools

_CONTROL = """Package: mcc-hello
Version: 1.0
Architecture: all
Maintainer: mcc tests <tests@mcc.invalid>
Description: a tiny package for mcc's apt test
"""


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it with apt-get)")
    return path


async def _build_repo(origin: Origin, work: Path) -> bytes:
    """A .deb built with dpkg-deb, a Packages index and an unsigned Release, served the
    way a Debian mirror serves them (no Cache-Control, Expires or ETag)."""
    pkg = work / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(_CONTROL)
    (pkg / "usr" / "share" / "mcc-hello").mkdir(parents=True)
    (pkg / "usr" / "share" / "mcc-hello" / "data").write_bytes(b"hello from mcc\n" * 4000)
    deb_path = work / "mcc-hello_1.0_all.deb"
    await trio.run_process(
        [_need("dpkg-deb"), "--root-owner-group", "--build", str(pkg), str(deb_path)],
        capture_stdout=True,
    )
    deb = deb_path.read_bytes()
    packages = (
        _CONTROL
        + f"Filename: repo/mcc-hello_1.0_all.deb\nSize: {len(deb)}\n"
        + f"SHA256: {hashlib.sha256(deb).hexdigest()}\n"
    ).encode()
    now = email.utils.formatdate(time.time(), usegmt=True)
    release = (
        f"Origin: mcc-test\nLabel: mcc-test\nSuite: repo/\nDate: {now}\n"
        "Architectures: all\nSHA256:\n"
        f" {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n"
    ).encode()
    # a mirror's answer: Last-Modified of a moment ago (heuristic lifetime ~0), no ETag
    # on the package; the indexes carry validators, so revalidation is a 304
    origin.put("/repo/mcc-hello_1.0_all.deb", deb, etag=None, last_modified=now)
    origin.put("/repo/Packages", packages, last_modified=now)
    origin.put("/repo/Release", release, last_modified=now)
    return deb


def _apt_env(work: Path, origin: Origin, proxy_port: int) -> tuple[list[str], dict[str, str]]:
    root = work / "apt"
    for d in ("parts", "lists/partial", "cache/archives/partial", "preferences.d", "trusted.d"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "status").write_text("")
    (root / "sources.list").write_text(f"deb [trusted=yes] {origin.url('/')} repo/\n")
    # read before the system's apt.conf.d, so it can point that elsewhere
    (root / "apt.conf").write_text(f'Dir::Etc::Parts "{root}/parts";\n')
    options = {
        "Dir::Etc::SourceList": root / "sources.list",
        "Dir::Etc::SourceParts": root / "parts",
        "Dir::Etc::Preferences": root / "preferences",
        "Dir::Etc::PreferencesParts": root / "preferences.d",
        "Dir::Etc::Trusted": root / "trusted.gpg",
        "Dir::Etc::TrustedParts": root / "trusted.d",
        "Dir::State": root,
        "Dir::State::Lists": root / "lists",
        "Dir::State::status": root / "status",
        "Dir::Cache": root / "cache",
        "Dir::Log": root,
        "Debug::NoLocking": "1",
        "APT::Sandbox::User": "root",
        "Acquire::Languages": "none",
        "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled": "false",
        "Acquire::http::Proxy": f"http://127.0.0.1:{proxy_port}",
        "Acquire::http::Timeout": "10",
        "Acquire::Retries": "0",
    }
    argv = [_need("apt-get"), "-q"]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    env = {"APT_CONFIG": str(root / "apt.conf"), "LC_ALL": "C", "PATH": "/usr/bin:/bin"}
    return argv, env


async def _apt(argv: list[str], env: dict[str, str], *args: str, cwd: Path) -> str:
    with trio.fail_after(60):
        proc = await trio.run_process(
            [*argv, *args], env=env, cwd=str(cwd), capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    assert "W: " not in out and "E: " not in out, out
    return out


def _conditional(origin: Origin) -> int:
    """Conditional requests for Release the origin received (mcc revalidating)."""
    return sum(
        1
        for r in origin.requests
        if r.target == "/repo/Release" and ({"if-none-match", "if-modified-since"} & set(r.headers))
    )


async def test_apt_update_and_download_through_mcc_twice(origin: Origin, tmp_path: Path) -> None:
    deb = await _build_repo(origin, tmp_path)
    async with run_node(tmp_path / "cache", allow_origins=[origin.authority]) as node:
        argv, env = _apt_env(tmp_path, origin, node.port)
        for round_ in (1, 2):
            before = {p: origin.count(p) for p in ("/repo/Release", "/repo/Packages")}
            conditional_before = _conditional(origin)
            await _apt(argv, env, "update", cwd=tmp_path)
            dl = tmp_path / f"download-{round_}"
            dl.mkdir()
            deb_fetches = origin.count("/repo/mcc-hello_1.0_all.deb")
            await _apt(argv, env, "download", "mcc-hello", cwd=dl)
            assert (dl / "mcc-hello_1.0_all.deb").read_bytes() == deb
            await node.cache.wait_idle()
            if round_ == 1:
                assert origin.count("/repo/mcc-hello_1.0_all.deb") > deb_fetches
                continue
            # the package: a hit, no upstream request at all
            assert origin.count("/repo/mcc-hello_1.0_all.deb") == deb_fetches
            # the index: asked upstream again, conditionally (a 304, not the bytes)
            assert origin.count("/repo/Release") > before["/repo/Release"]
            assert _conditional(origin) > conditional_before
