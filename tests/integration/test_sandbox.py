"""The sandbox against real sockets: an aiohttp client talking to it on 127.0.0.1, no mocks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import io
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from syncd.sandbox import (
    SANDBOX_STATE,
    RunningSandbox,
    SandboxConfig,
    create_app,
    start_sandbox,
)
from tests.helpers import control, sha256

V = "2026-07"
ACCOUNT = "625702934721171442"


def user_hash(n: int) -> str:
    return sha256(f"user{n}@example.com")


def result(body: Any) -> Any:
    """The add-remove counts, whichever of the two documented shapes carries them."""
    return body["data"].get("attributes", body["data"])


class Api:
    """A thin client: a session, the sandbox URL and a bearer token."""

    def __init__(self, session: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
        self.session = session
        self.sandbox = sandbox
        self.url = sandbox.url
        self.token = ""

    async def login(self) -> None:
        data = await self.form_token(grant_type="client_credentials")
        self.token = data[1]["access_token"]

    async def form_token(self, **form: str) -> tuple[int, Any]:
        form.setdefault("client_id", "sandbox-client")
        form.setdefault("client_secret", "sandbox-secret")
        async with self.session.post(f"{self.url}/oauth2/token", data=form) as resp:
            return resp.status, await resp.json()

    async def call(
        self, method: str, path: str, body: Any = None, **kw: Any
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        if body is not None:
            # A file-like body: aiohttp warns (ResourceWarning) about raw bodies over 1 MiB.
            kw["data"] = io.BytesIO(json.dumps(body).encode())
            headers["Content-Type"] = "application/json"
        async with self.session.request(method, self.url + path, headers=headers, **kw) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None, resp.headers

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        return await control(self.sandbox, method, path, body)

    async def segment(self, api: str = "retail-media", identifier_type: str = "Email") -> str:
        body = {"api": api, "identifier_type": identifier_type, "account_id": ACCOUNT}
        return str((await self.control("POST", "segments", body))["id"])

    async def members(self, segment_id: str) -> list[str]:
        return list((await self.control("GET", f"segments/{segment_id}?members=1"))["members"])

    async def rm_amend(
        self, segment_id: str, ids: list[str], op: str = "add", id_type: str = "Email", **kw: Any
    ) -> tuple[int, Any, Any]:
        body = {
            "data": {
                "type": "AddRemoveContactlist",
                "attributes": {"operation": op, "identifierType": id_type, "identifiers": ids},
            }
        }
        path = f"/{V}/retail-media/audience-segments/{segment_id}/contact-list/add-remove"
        return await self.call("POST", path, body, **kw)

    async def ms_amend(
        self, segment_id: str, ids: list[str], id_type: str = "email", **extra: Any
    ) -> tuple[int, Any, Any]:
        attrs = {"operation": "add", "identifierType": id_type, "identifiers": ids, **extra}
        body = {"data": {"type": "ContactlistAmendment", "attributes": attrs}}
        path = f"/{V}/marketing-solutions/audience-segments/{segment_id}/contact-list"
        return await self.call("PATCH", path, body)


@contextlib.asynccontextmanager
async def running(config: SandboxConfig) -> AsyncIterator[Api]:
    """A sandbox with this config, and a logged-in client for it."""
    async with (
        await start_sandbox(config) as sandbox,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, sandbox)
        await api.login()
        yield api


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with running(SandboxConfig(seed=7)) as client:
        yield client


# --- OAuth2 ---------------------------------------------------------------------------


async def test_token_is_issued_and_unlocks_the_api(api: Api) -> None:
    status, body = await api.form_token(grant_type="client_credentials")
    assert status == 200
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert len(body["access_token"]) >= 32
    seg = await api.segment()
    api.token = body["access_token"]
    status, _, _ = await api.call(
        "GET", f"/{V}/retail-media/accounts/{ACCOUNT}/audience-segments/{seg}/contact-list"
    )
    assert status == 200
    assert (await api.control("GET", "stats"))["token_requests"] == 2


async def test_token_refusals(api: Api) -> None:
    status, body = await api.form_token(grant_type="client_credentials", client_secret="nope")
    assert (status, body) == (401, {"error": "invalid_client"})
    status, body = await api.form_token(grant_type="password")
    assert status == 400 and body["error"] == "unsupported_grant_type"
    status, body = await api.form_token()
    assert status == 400


async def test_calls_without_a_valid_token_are_refused(api: Api) -> None:
    seg = await api.segment()
    api.token = "forged"
    status, body, _ = await api.rm_amend(seg, [user_hash(1)])
    assert status == 401
    assert body["errors"][0]["code"] == "authorization-token-invalid"
    async with api.session.post(
        f"{api.url}/{V}/retail-media/audience-segments/{seg}/contact-list/clear"
    ) as resp:
        assert resp.status == 401


async def test_tokens_really_expire() -> None:
    async with running(SandboxConfig(token_ttl_s=1)) as api:
        seg = await api.segment()
        assert (await api.rm_amend(seg, [user_hash(1)]))[0] == 200
        await asyncio.sleep(1.1)
        status, body, _ = await api.rm_amend(seg, [user_hash(2)])
        assert status == 401
        assert body["errors"][0]["code"] == "authorization-token-expired"
        await api.login()
        assert (await api.rm_amend(seg, [user_hash(2)]))[0] == 200


async def test_expire_tokens_control(api: Api) -> None:
    seg = await api.segment()
    await api.control("POST", "expire-tokens")
    status, body, _ = await api.rm_amend(seg, [user_hash(1)])
    assert status == 401 and body["errors"][0]["code"] == "authorization-token-expired"


# --- add / remove ----------------------------------------------------------------------


async def test_retail_media_answers_alternate_between_docs_and_sdk_shapes(api: Api) -> None:
    seg = await api.segment()
    status, first, _ = await api.rm_amend(seg, [user_hash(1), user_hash(2)])
    assert status == 200
    assert first["data"]["type"] == "AddRemoveContactlistResult"
    attrs = first["data"]["attributes"]
    assert attrs["nbValidIdentifiers"] == 2 and attrs["nbInvalidIdentifiers"] == 0
    assert attrs["contactListId"] > 2**53 and isinstance(attrs["contactListId"], int)
    assert attrs["operation"] == "add" and attrs["identifierType"] == "Email"
    assert attrs["requestDate"].endswith("Z") and len(attrs["requestDate"]) == 24
    assert first["errors"] == [] and first["warnings"] == []
    _, second, _ = await api.rm_amend(seg, [user_hash(3)], id_type="email")
    assert "attributes" not in second["data"] and "type" not in second["data"]
    assert second["data"]["nbValidIdentifiers"] == 1
    assert second["data"]["identifierType"] == "email"
    assert second["data"]["contactListId"] == attrs["contactListId"]


@pytest.mark.parametrize("shape", ["docs", "sdk"])
async def test_retail_media_fixed_shape(shape: str) -> None:
    async with running(SandboxConfig(response_shape=shape)) as api:
        seg = await api.segment()
        for _ in range(2):
            _, body, _ = await api.rm_amend(seg, [user_hash(1)])
            assert ("attributes" in body["data"]) is (shape == "docs")


async def test_marketing_solutions_patch(api: Api) -> None:
    seg = await api.segment("marketing-solutions", "email")
    status, body, _ = await api.ms_amend(seg, [user_hash(1), "a@b.com"])
    assert status == 200
    assert body["data"]["type"] == "ContactlistAmendment"
    assert body["data"]["attributes"]["nbValidIdentifiers"] == 2
    assert sorted(await api.members(seg)) == sorted([user_hash(1), "a@b.com"])


async def test_marketing_solutions_gum_needs_caller_id(api: Api) -> None:
    seg = await api.segment("marketing-solutions", "gum")
    status, body, _ = await api.ms_amend(seg, ["123"], id_type="gum")
    assert status == 400 and body["errors"][0]["code"] == "gum-caller-id-required"
    assert body["errors"][0]["instance"] == "@data/attributes/gumCallerId"
    status, body, _ = await api.ms_amend(seg, ["123"], id_type="gum", gumCallerId=42)
    assert status == 200 and body["data"]["attributes"]["nbValidIdentifiers"] == 1


def _too_many() -> list[str]:
    return [f"{n:064x}" for n in range(50_001)]


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("too_many", 400, "too-many-identifiers"),
        ("bad_type", 400, "invalid-identifier-type"),
        ("gum_on_rm", 400, "invalid-identifier-type"),
        ("bad_operation", 400, "invalid-operation"),
        ("not_strings", 400, "invalid-identifiers-format"),
        ("not_a_list", 400, "invalid-identifiers-format"),
        ("mismatch", 400, "identifier-type-mismatch"),
        ("unknown_segment", 404, "segment-not-found"),
        ("bad_json", 400, "invalid-json"),
        ("bad_data_type", 400, "invalid-type"),
    ],
)
async def test_amendment_validation(api: Api, case: str, status: int, code: str) -> None:
    seg = await api.segment()
    ids: Any = [user_hash(1)]
    kw: dict[str, Any] = {}
    if case == "too_many":
        ids = _too_many()
    elif case == "bad_type":
        kw["id_type"] = "Fingerprint"
    elif case == "gum_on_rm":
        kw["id_type"] = "Gum"
    elif case == "bad_operation":
        kw["op"] = "replace"
    elif case == "not_strings":
        ids = [user_hash(1), 42]
    elif case == "not_a_list":
        ids = user_hash(1)
    elif case == "mismatch":
        kw["id_type"] = "PhoneNumber"
    elif case == "unknown_segment":
        seg = "999"
    if case == "bad_json":
        path = f"/{V}/retail-media/audience-segments/{seg}/contact-list/add-remove"
        got, body, _ = await api.call("POST", path, data=b"{not json")
    elif case == "bad_data_type":
        path = f"/{V}/marketing-solutions/audience-segments/{seg}/contact-list"
        body = {"data": {"type": "AddRemoveContactlist", "attributes": {}}}
        ms = await api.segment("marketing-solutions", "email")
        got, body, _ = await api.call("PATCH", path.replace(seg, ms), body)
    else:
        got, body, _ = await api.rm_amend(seg, ids, **kw)
    assert got == status
    error = body["errors"][0]
    assert error["code"] == code and error["type"] == "validation"
    assert error["traceId"] and error["title"] and error["detail"]
    assert error["instance"].startswith("@")
    assert await api.members(seg if case != "unknown_segment" else await api.segment()) == []


async def test_fifty_thousand_identifiers_are_accepted_quickly(api: Api) -> None:
    seg = await api.segment()
    ids = _too_many()[:50_000]
    started = time.perf_counter()
    status, body, _ = await api.rm_amend(seg, ids)
    assert status == 200
    assert time.perf_counter() - started < 2.0
    assert (await api.control("GET", f"segments/{seg}"))["size"] == 50_000
    assert body["data"]["attributes"]["nbValidIdentifiers"] == 50_000


async def test_invalid_identifiers_are_counted_sampled_and_warned(api: Api) -> None:
    seg = await api.segment()
    bad = ["not-an-email", "a@b", "A" * 64, "x y@z.com", "", "@@.", "no@dots"]
    good = [user_hash(1), "0" * 32, "first.last@example.co.uk"]
    _, body, _ = await api.rm_amend(seg, good + bad)
    attrs = body["data"]["attributes"]
    assert attrs["nbValidIdentifiers"] == 3 and attrs["nbInvalidIdentifiers"] == 7
    assert attrs["sampleInvalidIdentifiers"] == bad[:5]
    (warning,) = body["warnings"]
    assert warning["code"] == "invalid-identifiers" and warning["type"] == "validation"
    assert warning["detail"] == "7 identifiers were invalid"
    assert sorted(await api.members(seg)) == sorted(good)


async def test_phone_madid_and_plain_types(api: Api) -> None:
    phone = await api.segment("retail-media", "PhoneNumber")
    ids = ["+33 01 23 45 67 89", "+330123-45-6789", user_hash(1), "0123456789", "+1234567"]
    _, body, _ = await api.rm_amend(phone, ids, id_type="phonenumber")
    assert body["data"]["attributes"]["nbInvalidIdentifiers"] == 2
    madid = await api.segment("marketing-solutions", "madid")
    ids = ["6D92078A-8246-4BA4-AE5B-76104861E7DC", user_hash(2), "not-a-uuid"]
    _, body, _ = await api.ms_amend(madid, ids, id_type="madid")
    assert body["data"]["attributes"]["nbValidIdentifiers"] == 2
    customer = await api.segment("retail-media", "CustomerId")
    _, body, _ = await api.rm_amend(customer, ["C-1", "C 2", ""], id_type="customerid")
    assert result(body)["nbValidIdentifiers"] == 1


async def test_member_set_semantics(api: Api) -> None:
    seg = await api.segment()
    await api.rm_amend(seg, [user_hash(1), user_hash(2)])
    await api.rm_amend(seg, [user_hash(2), user_hash(3), user_hash(3)])
    assert sorted(await api.members(seg)) == sorted([user_hash(1), user_hash(2), user_hash(3)])
    await api.rm_amend(seg, [user_hash(2), user_hash(9)], op="remove")
    assert sorted(await api.members(seg)) == sorted([user_hash(1), user_hash(3)])


async def test_counting_without_member_sets() -> None:
    async with running(SandboxConfig(keep_members=False)) as api:
        seg = await api.segment()
        await api.rm_amend(seg, [user_hash(1), user_hash(2)])
        await api.rm_amend(seg, [user_hash(3)], op="remove")
        info = await api.control("GET", f"segments/{seg}?members=1")
        assert info["size"] == 1 and info["members"] == []


# --- clear and statistics ---------------------------------------------------------------


async def test_clear_both_apis(api: Api) -> None:
    rm = await api.segment()
    await api.rm_amend(rm, [user_hash(1)])
    status, body, _ = await api.call(
        "POST", f"/{V}/retail-media/audience-segments/{rm}/contact-list/clear"
    )
    assert (status, body) == (204, None)
    assert await api.members(rm) == []
    ms = await api.segment("marketing-solutions", "email")
    await api.ms_amend(ms, [user_hash(1)])
    status, body, _ = await api.call(
        "DELETE", f"/{V}/marketing-solutions/audience-segments/{ms}/contact-list"
    )
    assert status == 200
    assert body["data"] == {"type": "ContactListAudienceSegment", "id": ms}
    assert await api.members(ms) == []


async def test_a_clear_meets_scripted_faults_like_an_amendment_and_is_logged(api: Api) -> None:
    """A clear can be made to fail (a status, a dropped connection) as an amendment can, and
    each clear is in the request log: what the clear-chunk tests of syncd steer and read."""
    rm = await api.segment()
    ms = await api.segment("marketing-solutions", "email")
    await api.rm_amend(rm, [user_hash(1)])
    await api.ms_amend(ms, [user_hash(1)])
    rm_clear = ("POST", f"/{V}/retail-media/audience-segments/{rm}/contact-list/clear")
    ms_clear = ("DELETE", f"/{V}/marketing-solutions/audience-segments/{ms}/contact-list")
    await api.control("POST", "faults", {"script": [{"status": 503}, {"drop": "after"}]})
    # (aiohttp re-sends an idempotent DELETE on its own after a drop: the POST is dropped)
    assert (await api.call(*ms_clear))[0] == 503
    assert await api.members(ms) == [user_hash(1)]
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await api.call(*rm_clear, headers={"Idempotency-Key": "c-1"})
    assert await api.members(rm) == []  # dropped after it was applied
    assert (await api.call(*ms_clear))[0] == 200
    log = (await api.control("GET", "stats"))["log"][2:]
    assert [(e["method"], e["operation"], e["count"], e["status"], e["fault"]) for e in log] == [
        ("DELETE", "clear", 0, 503, "status_503"),
        ("POST", "clear", 0, 0, "drop_after"),
        ("DELETE", "clear", 0, 200, None),
    ]
    assert [e["applied"] for e in log] == [False, True, True]
    assert log[1]["segment_id"] == rm and log[1]["idempotency_key"] == "c-1"


async def test_statistics_both_apis(api: Api) -> None:
    rm = await api.segment()
    await api.rm_amend(rm, [user_hash(n) for n in range(5)])
    status, body, _ = await api.call(
        "GET", f"/{V}/retail-media/accounts/{ACCOUNT}/audience-segments/{rm}/contact-list"
    )
    assert status == 200
    assert body["data"]["id"] == rm and body["data"]["type"] == "ContactlistStatistics"
    assert body["data"]["attributes"] == {
        "numberOfIdentifiers": 5,
        "numberOfMatches": 2,
        "matchRate": 0.5,
    }
    status, _, _ = await api.call(
        "GET", f"/{V}/retail-media/accounts/1/audience-segments/{rm}/contact-list"
    )
    assert status == 404
    ms = await api.segment("marketing-solutions", "email")
    await api.ms_amend(ms, [user_hash(1), user_hash(2)])
    status, body, _ = await api.call(
        "GET", f"/{V}/marketing-solutions/audience-segments/{ms}/contact-list/statistics"
    )
    assert status == 200 and body["data"]["attributes"]["numberOfIdentifiers"] == 2


# --- create and search ----------------------------------------------------------------------


def _rm_item(name: str, id_type: str = "Email") -> dict[str, Any]:
    attrs = {
        "name": name,
        "description": "d",
        "retailerId": "1234",
        "contactList": {"identifierType": id_type},
    }
    return {"type": "AudienceSegment", "attributes": attrs}


async def test_create_partial_approval(api: Api) -> None:
    path = f"/{V}/retail-media/accounts/{ACCOUNT}/audience-segments/create"
    status, body, _ = await api.call("POST", path, {"data": [_rm_item("CRM users")]})
    assert status == 200
    (entity,) = body["data"]
    assert entity["type"] == "AudienceSegment" and int(entity["id"]) > 0
    attrs = entity["attributes"]
    assert attrs["accountId"] == ACCOUNT and attrs["type"] == "ContactList"
    assert attrs["contactList"] == {
        "isReadOnly": False,
        "identifierType": "Email",
        "sharingStatus": "NotShared",
    }
    assert attrs["channels"] and attrs["createdAt"].endswith("Z")
    items = [_rm_item("crm USERS"), _rm_item("phones", "phonenumber"), _rm_item(" ")]
    status, body, _ = await api.call("POST", path, {"data": items})
    assert status == 200
    assert [e["attributes"]["name"] for e in body["data"]] == ["phones"]
    assert body["data"][0]["attributes"]["contactList"]["identifierType"] == "PhoneNumber"
    codes = {(w["instance"], w["code"]) for w in body["warnings"]}
    assert codes == {("@data/0", "name-must-be-unique"), ("@data/2", "name-must-not-be-empty")}
    # The created segment takes amendments of its own type.
    assert (await api.rm_amend(entity["id"], [user_hash(1)]))[0] == 200

    ms_path = f"/{V}/marketing-solutions/audience-segments/create"
    ms_item = {
        "type": "AudienceSegment",
        "attributes": {"name": "n", "advertiserId": "4949", "contactList": {}},
    }
    _, body, _ = await api.call("POST", ms_path, {"data": [ms_item, ms_item]})
    assert len(body["data"]) == 1 and body["data"][0]["attributes"]["advertiserId"] == "4949"
    assert [e["code"] for e in body["errors"]] == ["name-must-be-unique"]


async def test_search_pages_and_filters(api: Api) -> None:
    path = f"/{V}/retail-media/accounts/{ACCOUNT}/audience-segments"
    await api.call("POST", path + "/create", {"data": [_rm_item(f"s{n}") for n in range(7)]})
    await api.segment("marketing-solutions", "email")  # another API: never listed
    seen: list[str] = []
    offset = 0
    while True:
        status, body, _ = await api.call("POST", f"{path}/search?offset={offset}&limit=3", {})
        assert status == 200
        assert body["meta"] == {"totalItems": 7, "limit": 3, "offset": offset}
        seen += [e["id"] for e in body["data"]]
        offset += 3
        if offset >= body["meta"]["totalItems"]:
            break
    assert len(set(seen)) == 7
    query = {
        "data": {
            "type": "AudienceSegment",
            "attributes": {"audienceSegmentIds": seen[:2], "audienceSegmentTypes": ["ContactList"]},
        }
    }
    _, body, _ = await api.call("POST", path + "/search", query)
    assert [e["id"] for e in body["data"]] == seen[:2] and body["meta"]["limit"] == 50
    query["data"]["attributes"]["audienceSegmentTypes"] = ["Events"]
    _, body, _ = await api.call("POST", path + "/search", query)
    assert body["meta"]["totalItems"] == 0
    assert (await api.call("POST", path + "/search?limit=501", {}))[0] == 400
    assert (await api.call("POST", path + "/search?limit=500", {}))[0] == 200
    ms = f"/{V}/marketing-solutions/audience-segments/search"
    assert (await api.call("POST", ms + "?limit=101", {}))[0] == 400
    _, body, _ = await api.call("POST", ms + "?limit=100", {})
    assert body["meta"]["totalItems"] == 1


# --- versions ----------------------------------------------------------------------------


async def test_versions(api: Api) -> None:
    seg = await api.segment()
    stats = f"/retail-media/accounts/{ACCOUNT}/audience-segments/{seg}/contact-list"
    for version in ("2026-07", "2027-01", "preview"):
        status, _, headers = await api.call("GET", f"/{version}{stats}")
        assert status == 200 and "Deprecation" not in headers
    status, _, headers = await api.call("GET", f"/2026-01{stats}")
    assert status == 200
    assert headers["Deprecation"] == "true"
    assert headers["Sunset"] == "Wed, 27 Jan 2027 00:00:00 GMT"
    status, _, headers = await api.call(
        "POST", "/2026-01/retail-media/audience-segments/404/contact-list/clear"
    )
    assert status == 404 and headers["Deprecation"] == "true"
    for retired in ("2025-10", "2024-04", "2026-04"):
        status, body, _ = await api.call("GET", f"/{retired}{stats}")
        assert status == 410 and body["errors"][0]["code"]
    status, body, _ = await api.call("GET", f"/v1{stats}")
    assert status == 404 and body["errors"]


# --- scripted faults ----------------------------------------------------------------------


async def test_scripted_503_and_500_then_success(api: Api) -> None:
    seg = await api.segment()
    await api.control("POST", "faults", {"script": [{"status": 503}, {"status": 500}]})
    assert (await api.rm_amend(seg, [user_hash(1)]))[0] == 503
    assert (await api.rm_amend(seg, [user_hash(1)]))[0] == 500
    assert await api.members(seg) == []
    assert (await api.rm_amend(seg, [user_hash(1)]))[0] == 200
    assert await api.members(seg) == [user_hash(1)]


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [("2", "2"), ("Wed, 21 Oct 2026 07:28:00 GMT", "Wed, 21 Oct 2026 07:28:00 GMT"), (None, None)],
)
async def test_scripted_429_retry_after(
    api: Api, retry_after: str | None, header: str | None
) -> None:
    seg = await api.segment()
    fault: dict[str, Any] = {"status": 429}
    if retry_after is not None:
        fault["retry_after"] = retry_after
    await api.control("POST", "faults", {"script": [fault]})
    status, body, headers = await api.rm_amend(seg, [user_hash(1)])
    assert status == 429 and headers.get("Retry-After") == header
    assert body["errors"][0]["type"] == "quota"


async def test_scripted_400_and_401(api: Api) -> None:
    seg = await api.segment()
    script = [{"status": 400, "code": "some-code"}, {"status": 401}]
    await api.control("POST", "faults", {"script": script})
    status, body, _ = await api.rm_amend(seg, [user_hash(1)])
    assert status == 400 and body["errors"][0]["code"] == "some-code"
    status, body, _ = await api.rm_amend(seg, [user_hash(1)])
    assert status == 401 and body["errors"][0]["code"] == "authorization-token-expired"
    assert await api.members(seg) == []


@pytest.mark.parametrize(("when", "applied"), [("before", False), ("after", True)])
async def test_scripted_drop(api: Api, when: str, applied: bool) -> None:
    seg = await api.segment()
    await api.control("POST", "faults", {"script": [{"drop": when}]})
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await api.rm_amend(seg, [user_hash(1)], headers={"Idempotency-Key": "k-1"})
    assert (await api.members(seg) == [user_hash(1)]) is applied
    stats = await api.control("GET", "stats")
    (entry,) = stats["log"]
    assert entry["status"] == 0 and entry["applied"] is applied
    assert entry["fault"] == f"drop_{when}" and entry["idempotency_key"] == "k-1"
    assert stats["requests"]["rm_add_remove"] == {"dropped": 1}
    # The next request on the same session goes through on a fresh connection.
    assert (await api.rm_amend(seg, [user_hash(2)]))[0] == 200


async def test_scripted_raw_answers_are_sent_as_given(api: Api) -> None:
    """What a misbehaving API or a proxy may answer: any status, any bytes, any headers."""
    seg = await api.segment()
    html = b"<html>\xff\xfe Bad Gateway</html>"  # not UTF-8
    script = [
        {"status": 502, "body_base64": base64.b64encode(html).decode()},
        {"status": 200, "body": '{"errors": [{"code": "x"}]}', "headers": {"X-A": "1"}},
    ]
    await api.control("POST", "faults", {"script": script})
    path = f"/{V}/retail-media/audience-segments/{seg}/contact-list/add-remove"
    auth = {"Authorization": f"Bearer {api.token}"}
    async with api.session.post(api.url + path, json={}, headers=auth) as resp:
        assert (resp.status, await resp.read()) == (502, html)
    status, body, headers = await api.rm_amend(seg, [user_hash(1)])
    assert (status, body, headers["X-A"]) == (200, {"errors": [{"code": "x"}]}, "1")
    assert await api.members(seg) == []  # a raw answer applies nothing
    for bad in ({"status": 200}, {"status": 200, "body": 1}, {"body": "x"}):
        async with api.session.post(f"{api.url}/_sandbox/faults", json={"script": [bad]}) as r:
            assert r.status == 400


async def test_scripted_upload_drop_cuts_the_body_off(api: Api) -> None:
    seg = await api.segment()
    await api.control("POST", "faults", {"script": [{"drop": "upload"}]})
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await api.rm_amend(seg, [user_hash(n) for n in range(20_000)])
    stats = await api.control("GET", "stats")
    assert [e["fault"] for e in stats["log"]] == ["drop_upload"]
    assert stats["identifiers_received"] == 0 and await api.members(seg) == []


async def test_scripted_stall_still_applies(api: Api) -> None:
    seg = await api.segment()
    await api.control("POST", "faults", {"script": [{"stall_s": 1.0}]})
    with pytest.raises(TimeoutError):
        await api.rm_amend(seg, [user_hash(1)], timeout=aiohttp.ClientTimeout(total=0.3))
    assert await api.members(seg) == [user_hash(1)]


async def test_fault_bound_to_a_segment_waits_for_it(api: Api) -> None:
    one, two = await api.segment(), await api.segment()
    await api.control("POST", "faults", {"script": [{"status": 503, "segment_id": two}]})
    assert (await api.rm_amend(one, [user_hash(1)]))[0] == 200
    assert (await api.rm_amend(two, [user_hash(1)]))[0] == 503
    assert (await api.rm_amend(two, [user_hash(1)]))[0] == 200


async def test_bad_fault_settings_change_nothing(api: Api) -> None:
    for bad in (
        {"script": [{"status": 200}]},
        {"script": [{"drop": "sometimes"}]},
        {"fault_rate_5xx": 2},
        {"latency": 1},
    ):
        async with api.session.post(f"{api.url}/_sandbox/faults", json=bad) as resp:
            assert resp.status == 400
    assert await api.control("GET", "faults") == {
        "latency_ms": 0.0,
        "latency_jitter_ms": 0.0,
        "fault_rate_5xx": 0.0,
        "fault_rate_429": 0.0,
        "fault_rate_drop": 0.0,
        "retry_after_s": 1.0,
        "rate_limit_per_minute": None,
        "rate_limit_mode": "window",
        "rate_limit_burst": 4,
        "rate_limit_retry_after": False,
        "script": [],
    }


async def test_random_faults_follow_the_seed() -> None:
    config = SandboxConfig(seed=3, fault_rate_5xx=0.3, fault_rate_429=0.3, retry_after_s=0.5)
    outcomes: list[list[int]] = []
    for _ in range(2):
        async with running(config) as api:
            seg = await api.segment()
            answers = [await api.rm_amend(seg, [user_hash(n)]) for n in range(30)]
            statuses = [status for status, _, _ in answers]
            outcomes.append(statuses)
            assert set(statuses) == {200, 429, 503}
            assert {h.get("Retry-After") for s, _, h in answers if s == 429} == {"0.5"}
    assert outcomes[0] == outcomes[1]


async def test_random_drops_apply_first() -> None:
    async with running(SandboxConfig(fault_rate_drop=1.0)) as api:
        seg = await api.segment()
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await api.rm_amend(seg, [user_hash(1)])
        assert await api.members(seg) == [user_hash(1)]


# --- rate limit, concurrency, bookkeeping -----------------------------------------------------


async def test_rate_limit_headers_and_429_over_budget() -> None:
    async with running(SandboxConfig(rate_limit_per_minute=3)) as api:
        seg = await api.segment()
        remaining = []
        for n in range(3):
            status, _, headers = await api.rm_amend(seg, [user_hash(n)])
            assert status == 200 and headers["x-ratelimit-limit"] == "3"
            remaining.append(headers["x-ratelimit-remaining"])
            assert int(headers["x-ratelimit-reset"]) - time.time() <= 61
        assert remaining == ["2", "1", "0"]
        status, body, headers = await api.rm_amend(seg, [user_hash(9)])
        assert status == 429 and body["errors"][0]["type"] == "quota"
        # Criteo does not document Retry-After: only the x-ratelimit-* headers, by default.
        assert "Retry-After" not in headers and headers["x-ratelimit-remaining"] == "0"
        assert 0 < int(headers["x-ratelimit-reset"]) - time.time() <= 61
        assert user_hash(9) not in await api.members(seg)
        # Asked for, Retry-After comes too.
        await api.control("POST", "faults", {"rate_limit_retry_after": True})
        status, _, headers = await api.rm_amend(seg, [user_hash(9)])
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60
        # Lifting the budget at run time takes effect at once.
        await api.control("POST", "faults", {"rate_limit_per_minute": None})
        status, _, headers = await api.rm_amend(seg, [user_hash(9)])
        assert status == 200 and "x-ratelimit-limit" not in headers


async def test_bucket_holds_a_few_calls_and_refills_continuously() -> None:
    """A bucket: a minute's worth at once is refused after the first few calls, and one
    call comes back every 60/limit seconds (an injected clock, no waiting)."""
    config = SandboxConfig(rate_limit_per_minute=60, rate_limit_mode="bucket", rate_limit_burst=3)
    async with running(config) as api:
        now = [1_000_000.0]
        api.sandbox.state.budgets.clock = lambda: now[0]
        seg = await api.segment()
        answers = [await api.rm_amend(seg, [user_hash(n)]) for n in range(5)]
        assert [a[0] for a in answers] == [200, 200, 200, 429, 429]
        assert [a[2]["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0", "0"]
        assert answers[3][2]["x-ratelimit-reset"] == "1000001"  # one call a second
        now[0] += 1.0
        assert (await api.rm_amend(seg, [user_hash(5)]))[0] == 200
        assert (await api.rm_amend(seg, [user_hash(6)]))[0] == 429
        now[0] += 60.0  # refilled, but never past the few calls the bucket holds
        statuses = [(await api.rm_amend(seg, [user_hash(n)]))[0] for n in range(7, 12)]
        assert statuses == [200, 200, 200, 429, 429]


async def test_each_client_id_has_its_own_budget() -> None:
    config = SandboxConfig(rate_limit_per_minute=2, clients=(("brand-b", "b-secret"),))
    async with running(config) as api:
        seg = await api.segment()
        assert [(await api.rm_amend(seg, [user_hash(n)]))[0] for n in range(3)] == [200, 200, 429]
        status, data = await api.form_token(
            grant_type="client_credentials", client_id="brand-b", client_secret="b-secret"
        )
        assert status == 200
        api.token = data["access_token"]
        status, _, headers = await api.rm_amend(seg, [user_hash(9)])
        assert (status, headers["x-ratelimit-remaining"]) == (200, "1")
        # A wrong secret for a known client id is refused like an unknown client.
        status, _ = await api.form_token(
            grant_type="client_credentials", client_id="brand-b", client_secret="sandbox-secret"
        )
        assert status == 401
    assert "b-secret" not in repr(config)


async def test_max_in_flight_counts_concurrent_amendments() -> None:
    async with running(SandboxConfig(latency_ms=200)) as api:
        seg = await api.segment()
        started = time.perf_counter()
        results = await asyncio.gather(*(api.rm_amend(seg, [user_hash(n)]) for n in range(5)))
        assert [r[0] for r in results] == [200] * 5
        assert time.perf_counter() - started < 0.6  # the latency does not block the loop
        stats = await api.control("GET", "stats")
        assert stats["max_in_flight"] == 5 and stats["in_flight"] == 0
        assert stats["amendments_applied"] == 5 and stats["identifiers_received"] == 5
        assert stats["requests"]["rm_add_remove"] == {"200": 5}


async def test_stats_log_and_reset(api: Api) -> None:
    seg = await api.segment()
    await api.rm_amend(seg, [user_hash(1), "bad"], headers={"Idempotency-Key": "abc"})
    await api.rm_amend(seg, [user_hash(2)], op="remove")
    log = (await api.control("GET", "stats"))["log"]
    assert [(e["operation"], e["count"], e["status"], e["applied"]) for e in log] == [
        ("add", 2, 200, True),
        ("remove", 1, 200, True),
    ]
    assert log[0]["idempotency_key"] == "abc" and log[1]["idempotency_key"] is None
    assert log[0]["segment_id"] == seg and log[0]["identifier_type"] == "Email"
    assert abs(log[0]["at"] - time.time()) < 5
    await api.control("POST", "faults", {"script": [{"status": 503}], "latency_ms": 5})
    await api.control("POST", "reset")
    stats = await api.control("GET", "stats")
    assert stats["log"] == [] and stats["amendments_applied"] == 0
    assert (await api.control("GET", "faults"))["script"] == []
    async with api.session.get(f"{api.url}/_sandbox/segments/{seg}") as resp:
        assert resp.status == 404
    assert (await api.rm_amend(await api.segment(), [user_hash(1)]))[0] == 200  # the token survived


async def test_state_is_reachable_from_the_app() -> None:
    app = create_app(SandboxConfig(seed=1))
    state = app[SANDBOX_STATE]
    segment = state.add_segment("retail-media", ACCOUNT, "Email")
    assert state.segments[segment.id] is segment
    async with running(SandboxConfig()) as api:
        seg = await api.segment()
        await api.rm_amend(seg, [user_hash(1)])
        assert api.sandbox.state.segments[seg].members == {user_hash(1)}
        assert api.sandbox.app[SANDBOX_STATE] is api.sandbox.state


async def test_control_segment_seeding(api: Api) -> None:
    info = await api.control("POST", "segments", {"api": "marketing-solutions", "id": "42"})
    assert info == {"id": "42"}
    async with api.session.post(
        f"{api.url}/_sandbox/segments", json={"api": "marketing-solutions", "id": "42"}
    ) as resp:
        assert resp.status == 409
    async with api.session.post(
        f"{api.url}/_sandbox/segments", json={"api": "retail-media"}
    ) as resp:
        assert resp.status == 400  # Retail Media segments have an identifier type
    got = await api.control("GET", "segments/42")
    assert got["api"] == "marketing-solutions" and got["size"] == 0 and "members" not in got


async def test_syncd_sandbox_serves_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd",
        "sandbox",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert "sandbox_listening" in line
        url = line[line.index("http://") :].split()[0].strip("'\",")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/oauth2/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": "sandbox-client",
                    "client_secret": "sandbox-secret",
                },
            ) as resp,
        ):
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- the official SDKs as the yardstick ---------------------------------------------------
# Criteo's OpenAPI-generated SDKs check every answer against the schema; when installed
# (they are not a dependency) they must accept what the sandbox says.


def _sdk(package: str) -> Callable[[str], Any]:
    return lambda module: importlib.import_module(f"{package}.{module}")


def _drive_official_sdk(url: str, segment_id: str) -> dict[str, Any]:
    """Drive the sandbox with Criteo's own Retail Media SDK, strict type checks on."""
    sdk = _sdk("criteo_api_retailmedia_v2027_01")
    AudienceApi = sdk("api.audience_api").AudienceApi
    ApiClientBuilder = sdk("api_client_builder").ApiClientBuilder
    amendment = sdk("model.retail_media_contactlist_amendment")
    attributes = sdk("model.retail_media_contactlist_amendment_attributes")
    request = sdk("model.retail_media_contactlist_amendment_request")
    create_input = sdk("model.rm_audience_segment_bulk_create_input_v1")
    create_entity = sdk("model.rm_audience_segment_create_entity_v1")
    create_resource = sdk("model.rm_audience_segment_create_entity_v1_resource")
    search_input = sdk("model.rm_audience_segment_search_input_v1")
    search_entity = sdk("model.rm_audience_segment_search_entity_v1")
    search_resource = sdk("model.rm_audience_segment_search_entity_v1_resource")
    contact_list = sdk("model.rm_contact_list_create_v1")

    client = ApiClientBuilder.WithClientCredentials("sandbox-client", "sandbox-secret", host=url)
    audience = AudienceApi(client)
    out: dict[str, Any] = {}
    body = request.RetailMediaContactlistAmendmentRequest(
        data=amendment.RetailMediaContactlistAmendment(
            attributes=attributes.RetailMediaContactlistAmendmentAttributes(
                operation="add",
                identifier_type="Email",
                identifiers=[user_hash(1), user_hash(2), "bad"],
            )
        )
    )
    result = audience.add_remove_contact_list_by_audience_segment(segment_id, body)
    out["valid"] = result.data.nb_valid_identifiers
    out["contact_list_id"] = result.data.contact_list_id
    out["warnings"] = [w.code for w in result.warnings]
    stats = audience.get_audience_segment_contact_list_statistics(ACCOUNT, segment_id)
    out["size"] = stats.data.attributes.number_of_identifiers
    audience.clear_contact_list_by_audience_segment(segment_id)
    created = audience.bulk_create_audience_segments(
        ACCOUNT,
        create_input.RmAudienceSegmentBulkCreateInputV1(
            data=[
                create_resource.RmAudienceSegmentCreateEntityV1Resource(
                    type="AudienceSegment",
                    attributes=create_entity.RmAudienceSegmentCreateEntityV1(
                        name="sdk segment",
                        retailer_id="1234",
                        contact_list=contact_list.RmContactListCreateV1(identifier_type="Email"),
                    ),
                )
            ]
        ),
    )
    out["created"] = [e.attributes.name for e in created.data]
    found = audience.search_audience_segments(
        ACCOUNT,
        search_input.RmAudienceSegmentSearchInputV1(
            data=search_resource.RmAudienceSegmentSearchEntityV1Resource(
                type="AudienceSegment",
                attributes=search_entity.RmAudienceSegmentSearchEntityV1(
                    audience_segment_types=["ContactList"]
                ),
            )
        ),
        limit=500,
        offset=0,
    )
    out["found"] = found.meta.total_items
    return out


async def test_official_retail_media_sdk_accepts_the_sandbox() -> None:
    pytest.importorskip("criteo_api_retailmedia_v2027_01")
    async with running(SandboxConfig(response_shape="sdk")) as api:
        seg = await api.segment()
        out = await asyncio.to_thread(_drive_official_sdk, api.url, seg)
        assert out["valid"] == 2 and out["contact_list_id"] > 2**53
        assert out["warnings"] == ["invalid-identifiers"]
        assert out["size"] == 2 and await api.members(seg) == []
        assert out["created"] == ["sdk segment"] and out["found"] == 2


def _drive_official_ms_sdk(url: str, segment_id: str) -> dict[str, Any]:
    """The same with Criteo's Marketing Solutions SDK."""
    sdk = _sdk("criteo_api_marketingsolutions_v2027_01")
    AudienceApi = sdk("api.audience_api").AudienceApi
    ApiClientBuilder = sdk("api_client_builder").ApiClientBuilder
    search_entity = sdk("model.audience_segment_search_entity_v1")
    search_resource = sdk("model.audience_segment_search_entity_v1_resource")
    search_input = sdk("model.audience_segment_search_input_v1")
    amendment = sdk("model.contactlist_amendment")
    attributes = sdk("model.contactlist_amendment_attributes")
    request = sdk("model.contactlist_amendment_request")

    client = ApiClientBuilder.WithClientCredentials("sandbox-client", "sandbox-secret", host=url)
    audience = AudienceApi(client)
    body = request.ContactlistAmendmentRequest(
        data=amendment.ContactlistAmendment(
            type="ContactlistAmendment",
            attributes=attributes.ContactlistAmendmentAttributes(
                operation="add", identifier_type="email", identifiers=[user_hash(1), "bad"]
            ),
        )
    )
    result = audience.update_contact_list_by_audience_segment(segment_id, body)
    stats = audience.get_audience_segment_contact_list_statistics(segment_id)
    deleted = audience.delete_contact_list_by_audience_segment(segment_id)
    found = audience.search_audience_segments(
        search_input.AudienceSegmentSearchInputV1(
            data=search_resource.AudienceSegmentSearchEntityV1Resource(
                type="AudienceSegment",
                attributes=search_entity.AudienceSegmentSearchEntityV1(
                    audience_segment_types=["ContactList"]
                ),
            )
        ),
        limit=100,
        offset=0,
    )
    return {
        "valid": result.data.attributes.nb_valid_identifiers,
        "warnings": [w.code for w in result.warnings],
        "size": stats.data.attributes.number_of_identifiers,
        "deleted": deleted.data.id,
        "found": [e.id for e in found.data],
    }


async def test_official_marketing_solutions_sdk_accepts_the_sandbox() -> None:
    pytest.importorskip("criteo_api_marketingsolutions_v2027_01")
    async with running(SandboxConfig()) as api:
        seg = await api.segment("marketing-solutions", "email")
        out = await asyncio.to_thread(_drive_official_ms_sdk, api.url, seg)
        assert out == {
            "valid": 1,
            "warnings": ["invalid-identifiers"],
            "size": 1,
            "deleted": seg,
            "found": [seg],
        }
        assert await api.members(seg) == []
