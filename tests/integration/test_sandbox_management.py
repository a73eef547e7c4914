"""The sandbox's segment updates and deletions, driven by Criteo's official SDKs.

Both calls are bulk calls with partial approval: a refused item comes back as a problem
pointing at it (`@data/N`) while the others go through, in a 200.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from syncd.sandbox import SandboxConfig, start_sandbox

ACCOUNT = "625702934721171442"


def _sdk(package: str, module: str) -> Any:
    return importlib.import_module(f"{package}.{module}")


def _audience_api(package: str, url: str) -> Any:
    """The SDK's AudienceApi, logged in to the sandbox with its fixture credentials."""
    client = _sdk(package, "api_client_builder").ApiClientBuilder.WithClientCredentials(
        "sandbox-client", "sandbox-secret", host=url
    )
    return _sdk(package, "api.audience_api").AudienceApi(client)


def _retail_media(url: str, renamed: str, read_only: str, in_use: str) -> dict[str, Any]:
    """Rename two segments (one read-only) and delete two (one in an audience)."""
    pkg = "criteo_api_retailmedia_v2027_01"
    audience = _audience_api(pkg, url)
    update_entity = _sdk(pkg, "model.rm_audience_segment_update_entity_v1")
    update_resource = _sdk(pkg, "model.rm_audience_segment_update_entity_v1_resource")
    update_input = _sdk(pkg, "model.rm_audience_segment_bulk_update_input_v1")
    nillable = _sdk(pkg, "model.nillable_string")
    delete_resource = _sdk(pkg, "model.rm_audience_segment_delete_entity_v1_resource")
    delete_input = _sdk(pkg, "model.rm_audience_segment_bulk_delete_input_v1")

    def rename(segment_id: str, name: str) -> Any:
        return update_resource.RmAudienceSegmentUpdateEntityV1Resource(
            id=segment_id,
            type="AudienceSegment",
            attributes=update_entity.RmAudienceSegmentUpdateEntityV1(
                name=name, description=nillable.NillableString(value="from the SDK")
            ),
        )

    updated = audience.bulk_update_audience_segments(
        ACCOUNT,
        update_input.RmAudienceSegmentBulkUpdateInputV1(
            data=[rename(renamed, "vip, renamed"), rename(read_only, "not allowed")]
        ),
    )
    deleted = audience.bulk_delete_audience_segments(
        ACCOUNT,
        delete_input.RmAudienceSegmentBulkDeleteInputV1(
            data=[
                delete_resource.RmAudienceSegmentDeleteEntityV1Resource(
                    id=segment_id, type="AudienceSegment"
                )
                for segment_id in (renamed, in_use)
            ]
        ),
    )
    return {
        "updated": [(e.id, e.attributes.name) for e in updated.data],
        "update_problems": [(w.code, w.instance) for w in updated.warnings],
        "deleted": [e.id for e in deleted.data],
        "delete_problems": [(w.code, w.instance) for w in deleted.warnings],
    }


async def test_retail_media_update_and_delete_with_partial_approval() -> None:
    async with await start_sandbox(SandboxConfig(response_shape="sdk")) as sandbox:
        state = sandbox.state
        renamed = state.add_segment("retail-media", ACCOUNT, "Email").id
        read_only = state.add_segment("retail-media", ACCOUNT, "Email")
        read_only.read_only = True
        in_use = state.add_segment("retail-media", ACCOUNT, "Email")
        in_use.in_use = True
        out = await asyncio.to_thread(_retail_media, sandbox.url, renamed, read_only.id, in_use.id)
        assert out["updated"] == [(renamed, "vip, renamed")]
        assert out["update_problems"] == [("segment-is-read-only", "@data/1")]
        assert out["deleted"] == [renamed]
        assert out["delete_problems"] == [("segment-must-not-be-used-in-audience", "@data/1")]
        assert set(state.segments) == {read_only.id, in_use.id}
        assert read_only.name != "not allowed"


def _marketing_solutions(url: str, segment_id: str, other: str) -> dict[str, Any]:
    pkg = "criteo_api_marketingsolutions_v2027_01"
    audience = _audience_api(pkg, url)
    update_entity = _sdk(pkg, "model.audience_segment_update_entity_v1")
    update_resource = _sdk(pkg, "model.audience_segment_update_entity_v1_resource")
    update_input = _sdk(pkg, "model.audience_segment_bulk_update_input_v1")
    delete_resource = _sdk(pkg, "model.audience_segment_delete_entity_v1_resource")
    delete_input = _sdk(pkg, "model.audience_segment_bulk_delete_input_v1")
    updated = audience.update_audience_segments(
        update_input.AudienceSegmentBulkUpdateInputV1(
            data=[
                update_resource.AudienceSegmentUpdateEntityV1Resource(
                    id=segment_id,
                    type="AudienceSegment",
                    attributes=update_entity.AudienceSegmentUpdateEntityV1(name=name),
                )
                for name in ("app users", "app users")  # the second clashes with the first
            ]
        )
    )
    deleted = audience.delete_audience_segments(
        delete_input.AudienceSegmentBulkDeleteInputV1(
            data=[
                delete_resource.AudienceSegmentDeleteEntityV1Resource(id=i, type="AudienceSegment")
                for i in (other, "999")
            ]
        )
    )
    return {
        "updated": [e.attributes.name for e in updated.data],
        "deleted": [e.id for e in deleted.data],
        "delete_problems": [(e.code, e.instance) for e in deleted.errors],
    }


async def test_marketing_solutions_update_and_delete_with_partial_approval() -> None:
    async with await start_sandbox(SandboxConfig()) as sandbox:
        segment = sandbox.state.add_segment("marketing-solutions", "4949", None)
        other = sandbox.state.add_segment("marketing-solutions", "4949", None)
        out = await asyncio.to_thread(_marketing_solutions, sandbox.url, segment.id, other.id)
        # Renaming a segment to the name it already has is no clash with itself.
        assert out["updated"] == ["app users", "app users"]
        assert out["deleted"] == [other.id]
        assert out["delete_problems"] == [("segment-not-found", "@data/1")]
        assert set(sandbox.state.segments) == {segment.id}
