"""The shipped refresh rules: package files immutable, repository indexes rechecked.

Regression: apt fetching the same ``.deb`` twice through mcc got
``Cache-Status: ...; fwd=stale; fwd-status=304`` (a round trip) because Debian mirrors
send no Cache-Control, Expires or validators on package files.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fixtures.origin import Origin
from mcc.engine.blocks import ObjectMeta
from mcc.policy import RefreshRule, freshness_lifetime, matching_rule
from tests.helpers import get, run_node

NOW = 1_800_000_000.0


def _lifetime(url: str, *headers: tuple[str, str], rules: tuple[RefreshRule, ...] = ()) -> float:
    meta = ObjectMeta(url, "v", 1, headers=tuple(headers), fetched_at=NOW)
    return freshness_lifetime(meta, rules)


@pytest.mark.parametrize(
    "url",
    [
        "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb",
        "http://deb.debian.org/debian/pool/main/d/d-i/x_1_amd64.udeb",
        "http://mirror/fedora/Packages/b/bash-5.2-1.fc40.x86_64.rpm",
        "http://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/musl-1.2.5-r0.apk",
        "http://files.pythonhosted.org/packages/ab/cd/trio-0.25.0-py3-none-any.whl",
        "http://static.crates.io/crates/h11/h11-0.1.0.crate",
        "http://api.nuget.org/v3-flatcontainer/x/1.0.0/x.1.0.0.nupkg",
        "http://mirror/archlinux/core/os/x86_64/bash-5.2-1-x86_64.pkg.tar.zst",
        "http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/0123abcd",
        "http://7.tlu.dl.delivery.mp.microsoft.com/filestreamingservice/files/0c1d-4e?P1=1&P2=2",
        "http://download.windowsupdate.com/c/msdownload/update/software/secu/2024/01/x_abc.cab",
        "http://download.windowsupdate.com/d/msdownload/update/others/2024/x.exe",
        "http://download.windowsupdate.com/c/upgr/2024/05/x.esd",
        "http://tlu.dl.delivery.mp.microsoft.com/x/App_1.0.0.0_x64.msixbundle",
        "http://tlu.dl.delivery.mp.microsoft.com/x/App.appx",
        "http://dl.delivery.mp.microsoft.com/x/windows11.0-kb1-x64.psf",
    ],
)
def test_package_files_are_immutable(url: str) -> None:
    assert _lifetime(url) == math.inf


@pytest.mark.parametrize(
    "url",
    [
        "http://deb.debian.org/debian/dists/bookworm/InRelease",
        "http://deb.debian.org/debian/dists/bookworm/Release",
        "http://deb.debian.org/debian/dists/bookworm/Release.gpg",
        "http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.xz",
        "http://deb.debian.org/debian/dists/bookworm/main/source/Sources.gz",
        "http://mirror/fedora/repodata/repomd.xml",
        "http://mirror/archlinux/core/os/x86_64/core.db",
        "http://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/APKINDEX.tar.gz",
        # cab files republished under one name: the exceptions come first
        "http://ctldl.windowsupdate.com/msdownload/update/v3/static/trustedr/en/authrootstl.cab",
        "http://download.windowsupdate.com/microsoftupdate/v6/wsusscan/wsusscn2.cab",
    ],
)
def test_indexes_are_rechecked_every_time(url: str) -> None:
    # even when upstream says they may be kept an hour
    assert _lifetime(url, ("cache-control", "max-age=3600")) == 0


def test_other_content_keeps_rfc9111_and_user_patterns_win() -> None:
    assert matching_rule("http://h/releases/notes.html") is None
    assert matching_rule("http://h/dists/x/Release-notes") is None
    assert _lifetime("http://h/x.iso", ("cache-control", "max-age=60")) == 60
    user = (RefreshRule("*.deb", min_age=30), RefreshRule("*/InRelease", min_age=600))
    assert _lifetime("http://h/pool/a.deb", rules=user) == 30
    assert _lifetime("http://h/dists/x/InRelease", rules=user) == 600
    assert _lifetime("http://h/dists/x/Release", rules=user) == 0  # defaults still apply


async def test_a_package_without_validators_is_a_hit_the_second_time(
    origin: Origin, tmp_path: Path
) -> None:
    """What a Debian mirror sends for a .deb: no Cache-Control, Expires, ETag; a
    Last-Modified of a moment ago (heuristic lifetime ~0)."""
    origin.put("/pool/main/h/hello_1_all.deb", b"!<arch>\n" * 5000, etag=None)
    origin.put("/dists/x/InRelease", b"Origin: test\n", headers=(("cache-control", "max-age=600"),))
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        for path in ("/pool/main/h/hello_1_all.deb", "/dists/x/InRelease"):
            r = await get(node.port, origin.url(path))
            assert r.status == 200 and r.header("cache-status") == "node; fwd=miss; stored"
        await node.cache.wait_idle()
        before = origin.count("/pool/main/h/hello_1_all.deb")
        r = await get(node.port, origin.url("/pool/main/h/hello_1_all.deb"))
        assert r.header("cache-status") == "node; hit"
        assert origin.count("/pool/main/h/hello_1_all.deb") == before
        r = await get(node.port, origin.url("/dists/x/InRelease"))
        assert r.body == b"Origin: test\n"
        assert r.header("cache-status") == "node; fwd=stale; fwd-status=304"
