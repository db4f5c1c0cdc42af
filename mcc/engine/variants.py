"""Variants: responses that vary on request fields (RFC 9111 s4.1).

Theory of operation: an object whose response carries ``Vary`` (on anything but the
fields of :data:`mcc.policy.HARMLESS_VARY`) is stored as variants, each an ordinary
record under a secondary key (:func:`mcc.policy.variant_key`): the object's key plus
the values the request had for the fields named. The object's own key then holds a
*marker* record (version :data:`MARKER_VERSION`, no bytes) naming those fields and
the variants stored, at most ``max_variants``; a request for another variant beyond
that is forwarded unstored. A lookup first finds the marker, then the request's
variant. The first answer for an object that turns out to vary was fetched without
the request's fields: the discovery says so (:class:`Varies`), the marker is filed,
and the lookup asks again for the request's own variant (the fields a variant key
was made from go upstream with every request for its bytes). ``Vary: *`` is never
stored (:func:`mcc.policy.refusal`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import policy
from ..errors import NotCacheable
from ..store.records import ObjectMeta
from .fill import Filling

__all__ = ["MARKER_VERSION", "Varies", "Varying"]

# The version name of a marker record (no real version is named so: see make_version).
MARKER_VERSION = "vary"


class Varies(NotCacheable):
    """The answer varies on request fields the key asked with does not select on."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(f"upstream varies on {', '.join(names)}")
        self.names = names


def _marker(key: str, names: Sequence[str], variants: Sequence[str]) -> ObjectMeta:
    fields = (("vary", ", ".join(names)), *(("variant", v) for v in variants))
    return ObjectMeta(key=key, version=MARKER_VERSION, size=0, headers=fields)


def _listed(meta: ObjectMeta, name: str) -> list[str]:
    return [v for k, v in meta.headers if k == name]


class Varying(Filling):
    """The engine's variants (see the module)."""

    def _record_of(self, key: str) -> ObjectMeta | None:
        meta = self._metas.get(key)
        if meta is None:
            meta = self.store.get_object(key)
            if meta is not None:
                self._metas.put(meta)
        return meta

    def _variant_of(self, key: str, request: Sequence[tuple[str, str]]) -> str:
        """The key to look up for a request with fields ``request``: ``key`` itself,
        or the secondary key of its variant when ``key`` has variants."""
        marker = self._record_of(key)
        if marker is None or marker.version != MARKER_VERSION:
            return key
        names = tuple(sorted(n.strip() for n in _listed(marker, "vary")[0].split(",")))
        return policy.variant_key(key, [n for n in names if n], request)

    def _mark_varying(self, key: str, names: tuple[str, ...]) -> None:
        """File the marker saying ``key`` varies on ``names`` (its variants kept when
        the names are the same)."""
        old = self._record_of(key)
        variants: list[str] = []
        if old is not None and old.version == MARKER_VERSION:
            if _listed(old, "vary") == [", ".join(names)]:
                variants = _listed(old, "variant")
        elif old is not None:
            self._forget(old)
        self._adopt(_marker(key, names, variants))

    def _admit_variant(self, variant: str) -> None:
        """Count ``variant`` among its object's variants.

        Raises:
          NotCacheable: the object has ``max_variants`` others already.
        """
        key = policy.object_key(variant)
        marker = self._record_of(key)
        if marker is None or marker.version != MARKER_VERSION:
            return
        variants = _listed(marker, "variant")
        if variant in variants:
            return
        if len(variants) >= self.config.limits.max_variants:
            raise NotCacheable(f"{key} has {len(variants)} variants stored already")
        self._adopt(_marker(key, _listed(marker, "vary")[0].split(", "), [*variants, variant]))

    def _variants(self, key: str) -> list[str]:
        """The variant keys filed under ``key``'s marker (none when it has none)."""
        marker = self._record_of(key)
        if marker is None or marker.version != MARKER_VERSION:
            return []
        return _listed(marker, "variant")
