"""The identities the security tests call as, and the call metadata that carries them."""

from __future__ import annotations

from pathlib import Path

ALICE = "alice-0123456789abcdef"
BOB = "bob-fedcba9876543210xx"
#: The server environment that turns on signing of saved sessions (required with auth on).
SIGNED = {"RNNSERVE_SNAPSHOT_KEY": "snapshot-signing-key-0123456789abcdef"}


def auth(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata presenting ``token`` (none for None)."""
    return None if token is None else (("authorization", f"Bearer {token}"),)


def token_file(folder: Path) -> Path:
    """A ``--token-file`` in ``folder`` naming ALICE and BOB (owner-only, as it should be)."""
    tokens = folder / "tokens.txt"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    tokens.chmod(0o600)
    return tokens
