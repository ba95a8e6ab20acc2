"""Token fuzzing with JWT on and a real JWKS server: never a 5xx, always 401/403 (or 431 for a
header hypercorn finds too big), on every door: the ``Authorization`` header of a handshake,
a ``bearer.<token>`` subprotocol entry, the first-frame ``auth`` message (close 4401/4403) and
a REST route. See tests/support/fuzzing_gateway.py for the harness (one gateway for the module,
a control session with a valid token streaming the whole time).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from ..support.fuzz_budget import FUZZ_MODULE_TIMEOUT, SLOW_EXAMPLES
from ..support.fuzzing_exchange import raw_request
from ..support.fuzzing_gateway import FuzzGateway, FuzzStats, fuzz_settings
from ..support.fuzzing_tokens import DOORS, bad_tokens, check_token, upgrade

pytestmark = FUZZ_MODULE_TIMEOUT
STATS = FuzzStats()


@pytest.fixture(scope="module")
def jwt_gateway() -> Iterator[FuzzGateway]:
    with FuzzGateway(jwt=True) as gateway:
        yield gateway


def run_token(gateway: FuzzGateway, data: st.DataObject, door: str) -> None:
    """One bad token drawn for this gateway's issuer, presented at ``door``."""
    assert gateway.issuer is not None
    token, unscoped = data.draw(bad_tokens(gateway.issuer))
    check_token(gateway, token, unscoped, door, STATS)


@fuzz_settings(60)
@given(data=st.data(), door=DOORS)
def test_random_tokens_are_refused(
    jwt_gateway: FuzzGateway, data: st.DataObject, door: str
) -> None:
    run_token(jwt_gateway, data, door)


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES)
@given(data=st.data(), door=DOORS)
def test_random_tokens_are_refused_long(
    jwt_gateway: FuzzGateway, data: st.DataObject, door: str
) -> None:
    run_token(jwt_gateway, data, door)


def test_jwt_gateway_is_whole_after_the_fuzz(jwt_gateway: FuzzGateway) -> None:
    """No crash, no ERROR log, the control session's tokens exact, a valid token works."""
    gateway = jwt_gateway
    assert gateway.alive, f"gateway died: {gateway.failure!r}"
    assert gateway.errors.records == [], gateway.errors.records[:5]
    assert gateway.control.problems == [], gateway.control.problems[:5]
    assert gateway.control.turns >= 1
    request = upgrade("/api/v1/ws/fz-valid", [("Authorization", f"Bearer {gateway.token()}")])
    assert trio.run(raw_request, gateway.port, request).status == 101
    print(
        f"\ntoken fuzz figures: answers={STATS.handshakes} statuses={STATS.statuses} "
        f"first_frame_closes={STATS.close_codes} 5xx={STATS.server_errors} "
        f"control_turns={gateway.control.turns}"
    )
    assert STATS.server_errors == 0
