"""What a sandbox is started with, and the Criteo names it shares across its modules."""

from __future__ import annotations

from dataclasses import dataclass, field

RETAIL_MEDIA = "retail-media"
MARKETING_SOLUTIONS = "marketing-solutions"
LOG_SIZE = 10_000
RM_CONTACT_LIST_BASE = 523103620165619700  # above 2**53, as Criteo's ids are
RM_SEGMENT_BASE = 738406688413290496
MS_SEGMENT_BASE = 1000
RATE_WINDOW_S = 60.0

# Canonical spellings per API, keyed by lower case: the SDK enums (Retail Media) and the
# docs' enum (Marketing Solutions). Requests are matched case-insensitively.
RM_TYPES = {
    t.lower(): t for t in ("Email", "UserIdentifier", "IdentityLink", "CustomerId", "PhoneNumber")
}
MS_TYPES = {t.lower(): t for t in ("email", "madid", "identityLink", "gum", "phoneNumber")}


@dataclass(frozen=True)
class InitialSegment:
    """A segment the sandbox holds from its start, and again after a reset."""

    id: str
    api: str = RETAIL_MEDIA
    identifier_type: str | None = "email"  # None: any type (Marketing Solutions only)
    account_id: str = "1000"

    def __post_init__(self) -> None:
        if not (self.id.isascii() and self.id.isdigit()):
            raise ValueError(f"segment id {self.id!r} is not a number")
        if self.api not in (RETAIL_MEDIA, MARKETING_SOLUTIONS):
            raise ValueError(f"API {self.api!r} is not {RETAIL_MEDIA} or {MARKETING_SOLUTIONS}")
        types = RM_TYPES if self.api == RETAIL_MEDIA else MS_TYPES
        if self.identifier_type is not None and self.identifier_type.lower() not in types:
            known = ", ".join(types.values())
            raise ValueError(f"identifier type {self.identifier_type!r} is not one of {known}")

    @classmethod
    def parse(cls, spec: str) -> InitialSegment:
        """``ID[:API[:IDENTIFIER_TYPE]]``, as ``syncd sandbox --segment`` takes it."""
        parts = spec.split(":")
        if len(parts) > 3:
            raise ValueError(f"{spec!r} has more than three parts")
        return cls(*parts)

    def body(self) -> dict[str, str | None]:
        """The same segment as a ``POST /_sandbox/segments`` body."""
        return {
            "id": self.id,
            "api": self.api,
            "identifier_type": self.identifier_type,
            "account_id": self.account_id,
        }


@dataclass(frozen=True)
class SandboxConfig:
    # `syncd sandbox` passes CRITEO_CLIENT_ID/SECRET when they are set, so a user's .env
    # works against it unchanged.
    client_id: str = "sandbox-client"
    client_secret: str = "sandbox-secret"  # noqa: S105 - a fixture credential, not a secret
    token_ttl_s: int = 900
    latency_ms: float = 0.0  # added to every amendment/clear/stats request
    latency_jitter_ms: float = 0.0  # uniform extra 0..jitter
    # Retail Media add-remove answer: "docs" (counts under data.attributes), "sdk"
    # (counts directly under data), "alternate" (switch on every request).
    response_shape: str = "alternate"
    # The call budget per client id (None: unlimited), enforced as a fixed one-minute
    # window or as a bucket refilling continuously that holds `rate_limit_burst` calls.
    rate_limit_per_minute: int | None = None
    rate_limit_mode: str = "window"
    rate_limit_burst: int = 4
    # Criteo does not document Retry-After: a 429 carries it only when asked for.
    rate_limit_retry_after: bool = False
    fault_rate_5xx: float = 0.0
    fault_rate_429: float = 0.0
    fault_rate_drop: float = 0.0  # apply the amendment, then drop the connection
    retry_after_s: float = 1.0
    seed: int | None = None
    keep_members: bool = True  # False: only count, to save memory in the benchmark
    segments: tuple[InitialSegment, ...] = ()
    # More apps the sandbox accepts, as (client id, client secret): each its own budget.
    clients: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.response_shape not in ("docs", "sdk", "alternate"):
            raise ValueError("response_shape must be 'docs', 'sdk' or 'alternate'")
        ids = [segment.id for segment in self.segments]
        if len(set(ids)) < len(ids):
            raise ValueError("two initial segments share an id")
        if self.rate_limit_mode not in ("window", "bucket"):
            raise ValueError("rate_limit_mode must be 'window' or 'bucket'")

    def credentials(self) -> dict[str, str]:
        """Every client id the sandbox accepts, with its secret."""
        return {self.client_id: self.client_secret, **dict(self.clients)}
