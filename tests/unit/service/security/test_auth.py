"""Bearer tokens and their roles: which RPC each token may call, and the refusals, without a server."""

from __future__ import annotations

from typing import Any

import pytest

from clemserve.service.security.auth import ADMIN_METHODS, USER_METHODS, Role, TokenAuth, bearer_token

USER = "user-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
GENERATE = "/clemserve.v1.ModelService/Generate"
LOAD = "/clemserve.v1.ModelService/LoadModel"


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", f"Bearer {USER}"),), USER),
        ((("x-request-id", "r"), ("authorization", f"bearer  {USER} ")), USER),
        ((("authorization", f"Basic {USER}"),), None),
        ((("authorization", "Bearer "),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_token(metadata: Any, token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_roles() -> None:
    both = TokenAuth(USER, ADMIN)
    assert [both.role(t) for t in (USER, ADMIN, None, "", USER + "x", ADMIN[:-1])] == [
        Role.USER, Role.ADMIN, None, None, None, None,
    ]  # fmt: skip
    user_only = TokenAuth(USER, "")
    assert [user_only.role(t) for t in (USER, None, ADMIN)] == [Role.ADMIN, None, None]
    admin_only = TokenAuth("", ADMIN)
    assert [admin_only.role(t) for t in (ADMIN, None, USER)] == [Role.ADMIN, Role.USER, Role.USER]


def test_refusals() -> None:
    auth = TokenAuth(USER, ADMIN)

    def bearer(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    assert auth.refusal(GENERATE, ()).code == "UNAUTHENTICATED"  # type: ignore[union-attr]
    assert auth.refusal(GENERATE, bearer("wrong-token-0123456789")).code == "UNAUTHENTICATED"  # type: ignore[union-attr]
    assert auth.refusal(GENERATE, bearer(USER)) is None
    assert auth.refusal(LOAD, bearer(USER)).code == "PERMISSION_DENIED"  # type: ignore[union-attr]
    assert auth.refusal(LOAD, bearer(ADMIN)) is None
    assert auth.refusal(GENERATE, bearer(ADMIN)) is None
    # RPCs added later need the admin token until listed
    assert auth.refusal("/clemserve.v1.ModelService/Reset", bearer(USER)).code == "PERMISSION_DENIED"  # type: ignore[union-attr]
    for open_method in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        assert auth.refusal(open_method, ()) is None
    assert "/clemserve.v1.ModelService/UnloadModel" not in USER_METHODS


def test_every_rpc_is_classified() -> None:
    """A new RPC must be listed as a caller's or an admin's: the admin token guards it until then."""
    from clemserve.v1 import clemserve_pb2 as pb

    methods = {f"/clemserve.v1.ModelService/{m.name}" for m in pb.DESCRIPTOR.services_by_name["ModelService"].methods}
    assert methods <= USER_METHODS | ADMIN_METHODS, sorted(methods - USER_METHODS - ADMIN_METHODS)
    assert not USER_METHODS & ADMIN_METHODS
    auth = TokenAuth(USER, ADMIN)
    for method in methods:
        refused = auth.refusal(method, (("authorization", f"Bearer {USER}"),))
        assert (refused is not None) == (method in ADMIN_METHODS), method
