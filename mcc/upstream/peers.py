"""Peers: the other nodes of a cluster, which block each one owns, and whether it is up.

Theory of operation: ``peers`` lists the cluster's nodes by their client URL (a node
may list itself). Each node learns every peer's node id from its ``GET /health``
answer (header ``X-MCC-Node``) and recognises itself by its listen address or by its
own node id coming back. The *members* are this node plus every peer that is up.

Every (object URL, block) has one owner among the members: the member whose name
scores highest in a rendezvous hash of (member, URL, block) (Thaler and Ravishankar's
highest random weight). Removing a member only moves the blocks it owned; every other
block keeps its owner. A block fetch on a node that does not own the block goes first
to the owner, in forward-proxy form, marked with ``X-MCC-Peer: <node id>``; when the
owner fails it is marked down and the next owner is asked, down to this node itself,
which uses the normal routes (parents, origin).

Rules that keep the cluster free of loops and storms:

1. A node answering a marked request serves it from its store or its own upstream and
   never *starts* a request to another peer. The mark lives in a context variable set
   by the server for the request's task; trio copies the context into every task that
   task starts, so fetches and discoveries begun for a peer inherit it.
2. Chains of peer requests for one block climb strictly in score (a node asks a peer
   only when that peer outscores every member it knows, itself included), so even
   when two nodes disagree on who is up, no chain of peer requests comes back round.
3. A discovery (the first request for an unknown object) is single-flighted per node
   separately for marked and unmarked requests (see the engine), so that a marked
   request never waits on a discovery that is itself waiting on another peer.

Health: each peer is asked ``GET /health`` (HTTP/1.0, as a load balancer does) every
:data:`CHECK_INTERVAL` seconds while up; after :data:`FALL` failed checks in a row, or
one failed request, it is down and checked again after 0.5 s, 1 s, 2 s ... up to
``parent_backoff``. The checks run
in one task in the cache's nursery (:meth:`Peers.run`).
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import trio
from blake3 import blake3

from ..config import Config
from ..headers import is_digits
from ..origins import split_host_port

__all__ = [
    "CHECK_INTERVAL",
    "PEER_HEADER",
    "Peer",
    "Peers",
    "answering_peer",
    "owner",
    "peer_request",
    "score",
]

log = logging.getLogger("mcc.peers")

# The request header that marks a peer request; its value is the asking node's id.
PEER_HEADER = "x-mcc-peer"
# The response header of ``GET /health`` naming the answering node.
NODE_HEADER = "x-mcc-node"
# Seconds between health checks of a peer that is up. HAProxy's default is 2 s; a
# dead peer is usually noticed sooner, by the first request it fails.
CHECK_INTERVAL = 1.0
# First wait before checking a peer again after a failure; doubles up to parent_backoff.
BACKOFF_FIRST = 0.5
# A health check (connect, request, answer) must finish within this many seconds.
CHECK_TIMEOUT = 2.0
# Health checks failed in a row that take a peer out (HAProxy's "fall"): one slow answer
# on a busy node must not move its blocks. A failed request takes it out at once.
FALL = 2
# Most bytes of a health answer read (a 204 head is about 200 bytes).
_MAX_CHECK_ANSWER = 16 * 1024

_answering: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mcc_answering_peer", default=None
)


@contextmanager
def answering_peer(node: str) -> Iterator[None]:
    """Mark the current task (and every task it starts) as answering peer ``node``."""
    token = _answering.set(node)
    try:
        yield
    finally:
        _answering.reset(token)


def peer_request() -> str | None:
    """The node id of the peer whose request this task answers, or None."""
    return _answering.get()


def score(member: str, url: str, block: int) -> int:
    """The rendezvous weight of ``member`` for block ``block`` of ``url`` (64 bits)."""
    digest = blake3(f"{member}\n{url}\n{block}".encode()).digest(8)
    return int.from_bytes(digest, "big")


def owner(members: Sequence[str], url: str, block: int) -> str:
    """The member that owns block ``block`` of ``url``: the highest :func:`score`
    (ties, which need a 64-bit collision, go to the greater name).

    Raises:
      ValueError: ``members`` is empty.
    """
    if not members:
        raise ValueError("no members to choose an owner from")
    return max(members, key=lambda m: (score(m, url, block), m))


@attrs.define(eq=False)
class Peer:
    """One configured peer and what is known about it."""

    url: str
    host: str
    port: int
    node: str | None = None  # learned from its /health answer
    up: bool = False
    is_self: bool = False
    failures: int = 0  # checks failed in a row
    wake: trio.Event = attrs.field(factory=trio.Event)

    def as_json(self) -> dict[str, Any]:
        return {"node": self.node, "up": self.up, "self": self.is_self}


class Peers:
    """The cluster as this node sees it.

    Args:
      config: the node's configuration (``peers``, ``node_id``, ``listen``, timeouts).
    """

    def __init__(self, config: Config) -> None:
        self.node_id = config.node_id
        self._backoff_cap = max(BACKOFF_FIRST, config.timeouts.parent_backoff)
        self._connect_timeout = min(CHECK_TIMEOUT, config.timeouts.connect)
        self.peers: list[Peer] = []
        listen = {(a.host, a.port) for a in config.listen}
        for url in config.peers:
            host, port = split_host_port(url.split("://", 1)[1].split("/", 1)[0], 80)
            peer = Peer(url.rstrip("/"), host, port)
            peer.is_self = _names_listener(host, port, listen)
            self.peers.append(peer)
        self.served_bytes = 0  # body bytes this node sent in answer to peer requests
        self.received_bytes = 0  # body bytes of complete answers this node got from peers
        self._changed = trio.Event()  # set (and replaced) whenever the members change

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def active(self) -> bool:
        """True when at least one peer other than this node is configured."""
        return any(not p.is_self for p in self.peers)

    def members(self) -> list[str]:
        """This node's id plus the ids of the peers that are up, sorted."""
        names = {self.node_id}
        names.update(p.node for p in self.peers if p.up and p.node and not p.is_self)
        return sorted(names)

    def owner(self, url: str, block: int, exclude: frozenset[str] = frozenset()) -> Peer | None:
        """The peer owning block ``block`` of ``url``; None when this node owns it.

        Args:
          exclude: URLs of peers not to choose (already tried for this request).
        """
        live = {
            p.node: p
            for p in self.peers
            if p.up and p.node and not p.is_self and p.url not in exclude
        }
        if not live:
            return None
        return live.get(owner([self.node_id, *live], url, block))

    def find(self, url: str) -> Peer | None:
        """The configured peer with this URL, or None."""
        url = url.rstrip("/")
        return next((p for p in self.peers if p.url == url), None)

    def mark_down(self, url: str) -> None:
        """A request to peer ``url`` failed: take it out of the members until a health
        check finds it answering again (after the first backoff step)."""
        peer = self.find(url)
        if peer is None or not peer.up:
            return
        log.warning("peer %s (%s) failed a request: its blocks move on", peer.url, peer.node)
        peer.up = False
        peer.wake.set()
        self._notify()

    def health(self) -> dict[str, dict[str, Any]]:
        """Each peer URL -> {"node", "up", "self"}."""
        return {p.url: p.as_json() for p in self.peers}

    async def wait_changed(self) -> None:
        """Wait until a peer goes up or down, or turns out to be this node."""
        await self._changed.wait()

    async def wait_members(self, count: int) -> None:
        """Wait until ``count`` members (this node included) are known to be up."""
        while len(self.members()) < count:
            await self._changed.wait()

    # -- health checks -----------------------------------------------------------

    async def run(self) -> None:
        """Check every peer for the cache's whole life (a task in its nursery)."""
        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                if not peer.is_self:
                    nursery.start_soon(self._watch, peer)

    async def _watch(self, peer: Peer) -> None:
        while not peer.is_self:
            node = await self.check(peer)
            if node is not None and node == self.node_id:
                peer.is_self, peer.up, peer.node = True, False, node
                log.info("peer %s is this node (%s): skipped", peer.url, node)
                self._notify()
                return
            if node is not None:
                if not peer.up:
                    log.info("peer %s (%s) is up", peer.url, node)
                if peer.node not in (None, node):
                    log.warning("peer %s now answers as %s (was %s)", peer.url, node, peer.node)
                if not peer.up or peer.node != node:
                    peer.node, peer.up = node, True
                    self._notify()
                peer.failures = 0
                wait = CHECK_INTERVAL
            elif peer.up and peer.failures + 1 < FALL:
                peer.failures += 1
                wait = BACKOFF_FIRST  # once more soon, before taking it out
            else:
                if peer.up:
                    log.warning("peer %s (%s) failed its health checks", peer.url, peer.node)
                    peer.up = False
                    self._notify()
                wait = min(self._backoff_cap, BACKOFF_FIRST * 2**peer.failures)
                peer.failures = min(peer.failures + 1, 32)
            peer.wake = trio.Event()
            with trio.move_on_after(wait):
                await peer.wake.wait()
            if peer.wake.is_set():  # marked down by a failed request: the first step
                await trio.sleep(BACKOFF_FIRST)

    async def check(self, peer: Peer) -> str | None:
        """Ask ``peer`` for ``GET /health``; its node id when it answers 2xx, else None."""
        try:
            with trio.fail_after(CHECK_TIMEOUT):
                with trio.fail_after(self._connect_timeout):
                    stream = await trio.open_tcp_stream(peer.host, peer.port)
                async with stream:
                    await stream.send_all(b"GET /health HTTP/1.0\r\n\r\n")
                    answer = b""
                    while b"\r\n\r\n" not in answer and len(answer) < _MAX_CHECK_ANSWER:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        answer += chunk
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.debug("health check of peer %s failed: %r", peer.url, exc)
            return None
        status, headers = _parse_head(answer)
        if status is None or not 200 <= status < 300:
            return None
        node = headers.get(NODE_HEADER)
        if not node:
            log.warning("peer %s answers /health without %s: not mcc", peer.url, NODE_HEADER)
            return None
        return node

    async def summaries(self, token: str) -> list[dict[str, Any]]:
        """Every other peer's admin ``/summary`` (admin port from its /health answer);
        a peer that cannot be asked gets ``{"url", "error"}``."""
        out: list[dict[str, Any]] = []
        for peer in self.peers:
            if peer.is_self:
                continue
            try:
                out.append({"url": peer.url, **await self._admin_summary(peer, token)})
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError) as exc:
                out.append({"url": peer.url, "node": peer.node, "error": str(exc) or repr(exc)})
        return out

    async def _admin_summary(self, peer: Peer, token: str) -> dict[str, Any]:
        with trio.fail_after(CHECK_TIMEOUT):
            stream = await trio.open_tcp_stream(peer.host, peer.port)
            async with stream:
                await stream.send_all(b"GET /health HTTP/1.0\r\n\r\n")
                head = await _read_all(stream)
        status, headers = _parse_head(head)
        admin_port = headers.get("x-mcc-admin-port", "")
        if status is None or not is_digits(admin_port):
            raise ValueError("its /health answer names no admin port")
        auth = f"authorization: Bearer {token}\r\n" if token else ""
        with trio.fail_after(CHECK_TIMEOUT * 2):
            stream = await trio.open_tcp_stream(peer.host, int(admin_port))
            async with stream:
                host = f"[{peer.host}]" if ":" in peer.host else peer.host
                # the admin answers only requests that name it (no DNS rebinding)
                request = f"GET /summary HTTP/1.0\r\nhost: {host}:{admin_port}\r\n{auth}\r\n"
                await stream.send_all(request.encode("latin-1"))
                answer = await _read_all(stream)
        status, _ = _parse_head(answer)
        if status != 200:
            raise ValueError(f"its admin API answered {status}")
        doc = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        if not isinstance(doc, dict):
            raise ValueError("its admin API sent no JSON object")
        return doc


async def _read_all(stream: trio.SocketStream) -> bytes:
    out = b""
    while chunk := await stream.receive_some(65536):
        out += chunk
    return out


def _parse_head(data: bytes) -> tuple[int | None, dict[str, str]]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not is_digits(parts[1]):
        return None, {}
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _names_listener(host: str, port: int, listen: set[tuple[str, int]]) -> bool:
    """True when ``host:port`` is one of this node's listen addresses."""
    loopback = host in ("127.0.0.1", "::1", "localhost")
    for l_host, l_port in listen:
        if l_port != port or port == 0:
            continue
        if host == l_host or (loopback and l_host in ("0.0.0.0", "::", "")):
            return True
    return False
