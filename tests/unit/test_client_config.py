"""ClientConfig rejects settings that would otherwise fail far from where they were made."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from budget_client import BudgetClient, ClientConfig


def test_spool_dir_given_as_a_string_becomes_a_path(tmp_path: Path) -> None:
    client = BudgetClient("127.0.0.1:1", spool_dir=str(tmp_path / "spool"))
    assert client.config.spool_dir == tmp_path / "spool"
    assert client.spool.directory == tmp_path / "spool"


def test_a_single_address_string_is_one_replica() -> None:
    assert ClientConfig(addresses="10.0.0.5:50051").addresses == ("10.0.0.5:50051",)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        (
            "usage_report_interval_s",
            0,
            "usage_report_interval_s must be a number of seconds above 0",
        ),
        ("usage_report_interval_s", -1.0, "usage_report_interval_s must be"),
        ("timeout_s", float("nan"), "timeout_s must be"),
        ("connect_timeout_s", "2", "connect_timeout_s must be"),
        ("finish_timeout_s", True, "finish_timeout_s must be"),
        ("replay_interval_s", 0.0, "replay_interval_s must be"),
        ("fail_policy", "sometimes", "fail_policy must be 'open' or 'closed'"),
        ("addresses", (), "addresses must name at least one host:port"),
        ("addresses", ("",), "addresses must name at least one host:port"),
        ("reconnect_backoff_s", (2.0, 0.05), "0 < first <= largest"),
        ("reconnect_backoff_s", (0.0, 1.0), "0 < first <= largest"),
    ],
)
def test_a_setting_that_cannot_work_is_refused_when_made(
    setting: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ClientConfig(**{setting: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        BudgetClient(**{setting: value})


def test_the_defaults_are_accepted() -> None:
    config = ClientConfig()
    assert config.usage_report_interval_s == 0.25
    assert config.fail_policy == "open"


def test_a_client_used_in_a_second_event_loop_says_so(tmp_path: Path) -> None:
    """grpc.aio binds the channel to its first loop; a second asyncio.run used to fail
    with "Event loop is closed" from deep inside grpc."""
    client = BudgetClient("127.0.0.1:1", spool_dir=tmp_path / "spool")

    async def use() -> None:
        await client._budget_stub()

    asyncio.run(use())
    with pytest.raises(RuntimeError, match="first used in another event loop"):
        asyncio.run(use())
