"""The cluster-wide view: every node's ``/summary`` added up (``/summary?cluster=1``).

Bytes a node served to a peer, or fetched from one, stay inside the cluster; they are
taken out of the sums, so ``clientBytes`` is what the clients received and
``originBytes`` what crossed the upstream link (parents or origins) for all of them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cluster_summary"]


def _node_row(doc: dict[str, Any]) -> dict[str, Any]:
    if "error" in doc:
        return {"url": doc.get("url"), "nodeId": doc.get("node"), "error": doc["error"]}
    served_to_peers = int(doc.get("peerServedBytes", 0))
    from_peers = int(doc.get("peerReceivedBytes", 0))
    return {
        "url": doc.get("url"),
        "nodeId": doc.get("nodeId"),
        "clientBytes": int(doc["egressBytes"]) - served_to_peers,
        "originBytes": max(0, int(doc["upstreamBytes"]) - from_peers),
        "peerServedBytes": served_to_peers,
        "peerReceivedBytes": from_peers,
        "hitRatioBytes": doc["sinceStart"]["hitRatioBytes"],
        "openConnections": doc.get("openConnections", 0),
    }


def cluster_summary(own: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up this node's summary ``own`` and the peers' (``{"url", "error"}`` for a
    peer that could not be asked).

    Returns:
      ``{"nodes": [...], "answered", "unreachable", "clientBytes", "originBytes",
      "peerBytes", "hitRatioBytes"}``; the ratio is ``1 - originBytes / clientBytes``
      (None before any byte was served).
    """
    rows = [_node_row(own), *(_node_row(d) for d in others)]
    ok = [r for r in rows if "error" not in r]
    client = sum(r["clientBytes"] for r in ok)
    origin = sum(r["originBytes"] for r in ok)
    return {
        "nodes": rows,
        "answered": len(ok),
        "unreachable": len(rows) - len(ok),
        "clientBytes": client,
        "originBytes": origin,
        "peerBytes": sum(r["peerServedBytes"] for r in ok),
        "hitRatioBytes": round(1 - origin / client, 4) if client else None,
    }
