"""The HTTP API as README.md documents it, seen by a client over TLS."""

from __future__ import annotations

from tests.conftest import Pki, running_stpd
from tests.test_hostile_common import request, small_tar, tls_connect, tls_context


def test_every_route_answers_400_to_an_unknown_query_parameter(pki: Pki) -> None:
    client = pki.client_ini("query")
    with running_stpd(pki.layout) as stpd:
        with tls_connect(stpd, tls_context(pki, client)) as sock:
            answer = request(sock, "PUT", "/savesets?source=/q", small_tar())
        assert answer is not None and answer.status == 201, answer
        saveset = answer.json()["saveset"]  # type: ignore[index]
        for target in (
            "/status?foo=1",
            "/savesets?foo=1",
            "/savesets?source=/x",
            f"/savesets/{saveset}/meta?x=1",
            f"/savesets/{saveset}/entries?x=1",
            f"/savesets/{saveset}/verify?x=1",
        ):
            with tls_connect(stpd, tls_context(pki, client)) as sock:
                answer = request(sock, "GET", target)
            assert answer is not None and answer.status == 400, (target, answer)
            name = target.rsplit("?", 1)[1].split("=")[0]
            assert answer.json() == {"error": f"unknown query parameter {name!r}"}, target
