"""Default refresh rules: which content never changes under its name, and which must be
rechecked every time, shipped as data.

Package repositories and update CDNs mostly send no ``Cache-Control``, ``Expires`` or
validators on their files, so RFC 9111's heuristic makes them stale at once and every
repeat fetch costs a round trip. Caches built for this content treat package files as
immutable and revalidate only the indexes that name them:

- apt-cacher-ng, ``conf/acng.conf`` ``VfilePatternEx``/``PfilePatternEx`` and the
  built-in volatile patterns (``Release``, ``InRelease``, ``Packages*``, ``Sources*``,
  ``Translation-*``, ``repomd.xml``, ``*.db``) versus static package files;
- squid-deb-proxy, ``squid-deb-proxy.conf``: ``refresh_pattern deb$ 129600 100% 129600``
  and friends for packages, ``refresh_pattern Release$ 0 20% 2880`` for indexes;
- lancache (``lancachenet/monolithic``), which keeps Windows Update and other CDN
  content for a year (``proxy_cache_valid 200 206 3650d``);
- Debian's "by-hash" index files (``dists/*/by-hash/SHA256/<digest>``) are named by
  their content, see https://wiki.debian.org/DebianRepository/Format#indices_acquisition_via_hashsums_.28by-hash.29.
- Windows Update and Delivery Optimization content paths (``/c/msdownload/``,
  ``/d/msdownload/``, ``/c/upgr/``, ``/filestreamingservice/files/``) name files by
  their hash ("Windows Update troubleshooting: endpoints", Microsoft Learn).

Rules are matched in order, the first match wins, and the operator's
``refresh_patterns`` are tried before all of these. Patterns are fnmatch patterns tried
against the whole URL and against its path (see :class:`~mcc.policy.RefreshRule`).
"""

from __future__ import annotations

__all__ = ["IMMUTABLE", "VOLATILE", "VOLATILE_EXCEPTIONS", "VOLATILE_MAX_AGE"]

# Rechecked on every request (max_age 0): a 304 costs one small round trip, and a stale
# index makes clients ask for package files that no longer exist (apt's "Hash Sum
# mismatch"). apt-cacher-ng revalidates these every time too.
VOLATILE_MAX_AGE = 0.0

# Named like immutable content below but republished under the same name: Windows'
# certificate trust lists (authrootstl.cab, disallowedcertstl.cab, pinrulesstl.cab)
# and the WSUS offline scan catalog (wsusscn2.cab). Tried first.
VOLATILE_EXCEPTIONS: tuple[str, ...] = (
    "*/trustedr/*",
    "*/wsusscan/*",
)

IMMUTABLE: tuple[str, ...] = (
    # package files: a new build gets a new file name
    "*.deb",
    "*.udeb",
    "*.ddeb",
    "*.rpm",
    "*.drpm",
    "*.apk",
    "*.whl",
    "*.crate",
    "*.nupkg",
    "*.pkg.tar.*",
    # content-addressed index files (apt's Acquire-By-Hash)
    "*/by-hash/*",
    # Delivery Optimization and Windows Update content
    "/filestreamingservice/files/*",
    "*/c/msdownload/*",
    "*/d/msdownload/*",
    "*/c/upgr/*",
    "*/d/upgr/*",
    "*.msix",
    "*.msixbundle",
    "*.appx",
    "*.appxbundle",
    "*.cab",
    "*.esd",
    "*.psf",
    "*.msu",
)

VOLATILE: tuple[str, ...] = (
    # Debian and Ubuntu
    "*/InRelease",
    "*/Release",
    "*/Release.gpg",
    "*/Packages*",
    "*/Sources*",
    "*/Translation-*",
    "*/Contents-*",
    # RPM (dnf, zypper)
    "*/repomd.xml",
    "*/repomd.xml.asc",
    # pacman
    "*.db",
    "*.db.sig",
    "*.files",
    "*.files.sig",
    # Alpine
    "*/APKINDEX.tar.gz",
)
