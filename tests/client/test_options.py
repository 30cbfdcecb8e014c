"""ClientOptions: validation, metadata (bearer token, session affinity) and backoff."""

from __future__ import annotations

import dataclasses

import pytest
from rnnserve.client import ClientOptions


def test_options_are_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        ClientOptions(5.0)  # type: ignore[misc]
    options = ClientOptions(timeout=5.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.timeout = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"retries": -1},
        {"backoff": -0.1},
        {"client_certificate": b"pem"},
        {"client_private_key": b"pem"},
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ClientOptions(**kwargs)  # type: ignore[arg-type]


def test_call_metadata_carries_token_session_and_extra_headers() -> None:
    options = ClientOptions(bearer_token="t0k", metadata=(("X-Tenant", "a"),))
    assert options.call_metadata() == (("x-tenant", "a"), ("authorization", "Bearer t0k"))
    assert options.call_metadata("s-1")[-1] == ("x-rnnserve-session-id", "s-1")


def test_backoff_doubles_up_to_its_cap() -> None:
    options = ClientOptions(backoff=0.1, max_backoff=0.3)
    assert [options.backoff_delay(i) for i in range(4)] == [0.1, 0.2, 0.3, 0.3]


def test_tls_is_chosen_by_any_tls_setting() -> None:
    assert not ClientOptions().uses_tls
    assert ClientOptions(tls=True).uses_tls
    assert ClientOptions(root_certificates=b"pem").uses_tls


def test_a_retry_waits_the_longer_of_the_backoff_and_the_servers_delay_up_to_the_cap() -> None:
    options = ClientOptions(backoff=0.1, max_backoff=1.0, jitter=0.0)
    assert options.retry_delay(0) == options.backoff_delay(0) == 0.1
    assert options.retry_delay(0, 0.25) == 0.25  # the server asked for longer
    assert options.retry_delay(3, 0.25) == 0.8  # the backoff has grown past it
    assert options.retry_delay(0, 30.0) == 1.0  # capped at max_backoff
    assert options.retry_delay(0, 0.0) == 0.1


def test_jitter_stretches_each_wait_by_up_to_its_share_never_shortens_it() -> None:
    options = ClientOptions(backoff=0.1, max_backoff=1.0, jitter=0.2)
    waits = [options.retry_delay(0, 0.25) for _ in range(200)]
    assert all(0.25 <= wait <= 0.25 * 1.2 for wait in waits)
    assert max(waits) - min(waits) > 0.02  # spread out: clients turned away together part
    waits = [options.retry_delay(1) for _ in range(200)]
    assert all(0.2 <= wait <= 0.2 * 1.2 for wait in waits)


@pytest.mark.parametrize("jitter", [-0.1, 1.5])
def test_jitter_outside_0_to_1_is_refused(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        ClientOptions(jitter=jitter)
