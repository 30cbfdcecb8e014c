"""The identities the security tests call as, and the call metadata that carries them."""

from __future__ import annotations

ALICE = "alice-0123456789abcdef"
BOB = "bob-fedcba9876543210xx"
#: The server environment that turns on signing of saved sessions (required with auth on).
SIGNED = {"RNNSERVE_SNAPSHOT_KEY": "snapshot-signing-key-0123456789abcdef"}


def auth(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata presenting ``token`` (none for None)."""
    return None if token is None else (("authorization", f"Bearer {token}"),)
