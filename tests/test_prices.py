"""Prices: USD budgets charged exactly per model, the shipped table, AdminService, budgetctl.

Costs are hand-computed in nano-dollars (1 USD = 10^9) from prices per million tokens.
The converter is tested on the table budgetd ships and, when a litellm wheel is at hand
(BUDGETD_LITELLM_WHEEL, or /tmp/litellm_dl), on the file LiteLLM bundles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import json
import logging
import math
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.app import BudgetServer
from budget_server.clock import ManualClock
from budget_server.ctl.prices_cmd import per_mtok
from budget_server.limits import AMOUNT_MAX
from budget_server.pricing.litellm import (
    IMPORT_BYTES_MAX,
    PriceFileError,
    convert,
    nanousd_per_mtok,
    parse,
    shipped_table,
)
from tests.support.ledger import assert_ledger_clean, create
from tests.support.servers import Stubs, stubs

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "budget_server" / "pricing" / "prices.json"
WHEEL_MEMBER = "litellm/model_prices_and_context_window_backup.json"
USD = 10**9  # nano-dollars
DOLLAR_PER_MTOK = 10**9  # nano-dollars per million tokens
RUN_TIMEOUT_S = 60

# gpt-4o at $2.50 input, $1.25 cached input, $10 output per million tokens (LiteLLM's price).
GPT_4O = (2_500_000_000, 1_250_000_000, 10_000_000_000)


def litellm_file(entries: dict[str, Any]) -> bytes:
    return json.dumps(entries, indent=1).encode()


SMALL_LITELLM = {
    "sample_spec": {"mode": "one of: chat, embedding, completion", "input_cost_per_token": 0.0},
    # 1.5e-07 is not a binary float; its repr is what the maintainers wrote.
    "gpt-x": {
        "litellm_provider": "openai",
        "mode": "chat",
        "input_cost_per_token": 1.5e-07,
        "cache_read_input_token_cost": 7.5e-08,
        "output_cost_per_token": 6e-07,
        "max_input_tokens": 128000,
    },
    "acme/gpt-x": {
        "litellm_provider": "acme",
        "mode": "chat",
        "input_cost_per_token": 2e-07,
        "output_cost_per_token": 8e-07,
    },
    "acme/completer": {"mode": "completion", "input_cost_per_token": 1, "output_cost_per_token": 2},
    "acme/responder": {
        "mode": "responses",
        "input_cost_per_token": 3e-06,
        "cache_read_input_token_cost": 3e-07,
        "output_cost_per_token": 1.2e-05,
    },
    "acme/embedder": {
        "mode": "embedding",
        "input_cost_per_token": 1e-07,
        "output_cost_per_token": 0.0,
    },
    "acme/no-output-price": {"mode": "chat", "input_cost_per_token": 1e-06},
    # Float noise in the file's own text: 2999990000.0000002 nano-dollars per Mtok.
    "acme/noisy": {
        "mode": "chat",
        "input_cost_per_token": 2.9999900000000002e-06,
        "output_cost_per_token": 1e-05,
    },
}
SMALL_IMPORTED = {
    "gpt-x": (150_000_000, 75_000_000, 600_000_000),
    "acme/gpt-x": (200_000_000, 200_000_000, 800_000_000),  # no cache price: cached = input
    "acme/completer": (10**15, 10**15, 2 * 10**15),
    "acme/responder": (3_000_000_000, 300_000_000, 12_000_000_000),
}
SMALL_SKIPPED = 4  # sample_spec, the embedding, the entry without an output price, the noisy one


def price(model: str, amounts: tuple[int, int, int]) -> pb.ModelPrice:
    return pb.ModelPrice(
        model=model,
        input_nanousd_per_mtok=amounts[0],
        cached_input_nanousd_per_mtok=amounts[1],
        output_nanousd_per_mtok=amounts[2],
    )


def amounts(p: pb.ModelPrice) -> tuple[int, int, int]:
    return (p.input_nanousd_per_mtok, p.cached_input_nanousd_per_mtok, p.output_nanousd_per_mtok)


async def set_price(api: Stubs, model: str, values: tuple[int, int, int]) -> pb.ModelPrice:
    return (await api.admin.SetPrice(pb.SetPriceRequest(price=price(model, values)))).price


async def all_prices(api: Stubs, prefix: str = "", page_size: int = 1000) -> list[pb.ModelPrice]:
    found: list[pb.ModelPrice] = []
    token = ""
    while True:
        page = await api.admin.ListPrices(
            pb.ListPricesRequest(prefix=prefix, page_size=page_size, page_token=token)
        )
        found.extend(page.prices)
        token = page.next_page_token
        if not token:
            return found


async def get_price(api: Stubs, model: str) -> pb.ModelPrice | None:
    return next((p for p in await all_prices(api, model) if p.model == model), None)


async def charge(
    api: Stubs, budget_id: str, model: str, estimate: pb.Usage, usage: pb.Usage
) -> tuple[pb.ReserveResponse, pb.CommitResponse]:
    reserved = await api.budget.Reserve(
        pb.ReserveRequest(budget_id=budget_id, estimate=estimate, model=model)
    )
    committed = await api.budget.Commit(
        pb.CommitRequest(reservation_id=reserved.reservation.id, usage=usage)
    )
    return reserved, committed


async def budget(api: Stubs, budget_id: str) -> pb.Budget:
    return (await api.admin.GetBudget(pb.GetBudgetRequest(budget_id=budget_id))).budget


# ---------------------------------------------------------------- charging USD budgets


async def test_usd_charge_is_the_hand_computed_cost(api: Stubs) -> None:
    await set_price(api, "gpt-4o", GPT_4O)
    await create(api, "usd:a", 10 * USD, unit=pb.UNIT_USD)
    reserved, committed = await charge(
        api,
        "usd:a",
        "gpt-4o",
        estimate=pb.Usage(input_tokens=1000, output_tokens=500),
        # 400 of the 1,000 input tokens were cache reads; 200 of the output was reasoning.
        usage=pb.Usage(
            input_tokens=1000, cached_input_tokens=400, output_tokens=500, reasoning_tokens=200
        ),
    )
    # Estimate, all uncached: (1000 x 2.50 + 500 x 10) / 10^6 USD = $0.0075.
    assert reserved.reservation.granted == 7_500_000
    # (600 x 2.50 + 400 x 1.25 + 500 x 10) / 10^6 USD = $0.007; cached tokens save $0.0005.
    assert committed.charged == 7_000_000
    assert committed.overage == 0
    after = await budget(api, "usd:a")
    assert (after.spent, after.reserved) == (7_000_000, 0)
    await assert_ledger_clean(api)


async def test_dated_model_is_priced_as_its_family(api: Stubs) -> None:
    await set_price(api, "acme-chat", (1 * DOLLAR_PER_MTOK, 0, 2 * DOLLAR_PER_MTOK))
    await create(api, "usd:dated", 100 * USD, unit=pb.UNIT_USD)
    usage = pb.Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    for model in ("acme-chat-2031-01-01", "acme-chat-20310101"):
        _, committed = await charge(api, "usd:dated", model, usage, usage)
        assert committed.charged == 3 * USD, model
    # The shipped table has gpt-4o; a snapshot it does not list is priced as gpt-4o.
    assert await get_price(api, "gpt-4o-2031-01-01") is None
    _, committed = await charge(api, "usd:dated", "gpt-4o-2031-01-01", usage, usage)
    assert committed.charged == 12_500_000_000  # $2.50 + $10
    assert (await budget(api, "usd:dated")).spent == 6 * USD + committed.charged


async def test_sub_nano_dollar_prices_round_up_once_per_charge(api: Stubs) -> None:
    # 37.5, 12.5 and 62.5 nano-dollars per token: no token costs a whole nano-dollar.
    await set_price(api, "acme-tiny", (37_500_000, 12_500_000, 62_500_000))
    await create(api, "usd:tiny", USD, unit=pb.UNIT_USD)
    one_each = pb.Usage(input_tokens=1, output_tokens=1)
    _, committed = await charge(api, "usd:tiny", "acme-tiny", one_each, one_each)
    assert committed.charged == 100  # 37.5 + 62.5; rounding each part would charge 101
    three_in = pb.Usage(input_tokens=3)
    reserved, committed = await charge(api, "usd:tiny", "acme-tiny", three_in, three_in)
    assert reserved.reservation.granted == 113  # 112.5 rounded up
    assert committed.charged == 113
    cached = pb.Usage(input_tokens=3, cached_input_tokens=3)
    _, committed = await charge(api, "usd:tiny", "acme-tiny", cached, cached)
    assert committed.charged == 38  # 3 x 12.5 = 37.5
    assert (await budget(api, "usd:tiny")).spent == 100 + 113 + 38
    await assert_ledger_clean(api)


async def test_unknown_model_is_refused_until_a_default_price_exists(api: Stubs) -> None:
    await create(api, "usd:unknown", 10 * USD, unit=pb.UNIT_USD)
    usage = pb.Usage(input_tokens=2_000, output_tokens=1_000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await charge(api, "usd:unknown", "mystery-model-9", usage, usage)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'mystery-model-9'" in (caught.value.details() or "")
    assert (await budget(api, "usd:unknown")).reserved == 0

    default = await set_price(api, "*", (5 * DOLLAR_PER_MTOK, 5 * DOLLAR_PER_MTOK, 15 * 10**9))
    assert default.model == "*"
    _, committed = await charge(api, "usd:unknown", "mystery-model-9", usage, usage)
    assert committed.charged == (2_000 * 5 + 1_000 * 15) * 1_000  # $0.025
    # A model with its own price is not charged at the default.
    await set_price(api, "gpt-4o", GPT_4O)
    _, committed = await charge(api, "usd:unknown", "gpt-4o", usage, usage)
    assert committed.charged == (2_000 * 2_500 + 1_000 * 10_000)
    await assert_ledger_clean(api)


async def test_mixed_hierarchy_charges_each_budget_in_its_own_unit(api: Stubs) -> None:
    await set_price(api, "gpt-4o", GPT_4O)
    await create(api, "org:mixed", 10 * USD, unit=pb.UNIT_USD)
    await create(api, "org:mixed/team:t", 100_000, parent="org:mixed")
    reserved, committed = await charge(
        api,
        "org:mixed/team:t",
        "gpt-4o",
        estimate=pb.Usage(input_tokens=1000, output_tokens=500),
        usage=pb.Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=500),
    )
    assert reserved.reservation.granted == 1_500  # the team's own unit: tokens
    assert committed.charged == 1_500
    team, root = await budget(api, "org:mixed/team:t"), await budget(api, "org:mixed")
    assert (team.spent, team.reserved) == (1_500, 0)
    assert (root.spent, root.reserved) == (7_000_000, 0)  # $0.007, as hand-computed above
    await assert_ledger_clean(api)


# ---------------------------------------------------------------- AdminService


async def test_set_price_validates_and_records_manual_source(
    api: Stubs, clock: ManualClock
) -> None:
    stored = await set_price(api, "acme/model@2031:v1", (1, 0, AMOUNT_MAX))
    assert (stored.model, stored.source, stored.updated_at_us) == (
        "acme/model@2031:v1",
        "manual",
        clock.now_us(),
    )
    assert amounts(stored) == (1, 0, AMOUNT_MAX)
    listed = await get_price(api, "acme/model@2031:v1")
    assert listed == stored

    bad = [
        price("", (1, 1, 1)),
        price("m" * 129, (1, 1, 1)),
        price("has space", (1, 1, 1)),
        price("ok", (-1, 1, 1)),
        price("ok", (1, -1, 1)),
        price("ok", (1, 1, AMOUNT_MAX + 1)),
    ]
    for request in [pb.SetPriceRequest(), *(pb.SetPriceRequest(price=p) for p in bad)]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.admin.SetPrice(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    assert await get_price(api, "ok") is None
    long_ok = await set_price(api, "m" * 128, (1, 1, 1))
    assert long_ok.model == "m" * 128


async def test_list_prices_filters_by_prefix_and_pages(api: Stubs) -> None:
    models = [f"zz-test/m{n}" for n in range(7)]
    for n, model in enumerate(reversed(models)):
        await set_price(api, model, (n, n, n))
    await set_price(api, "zz-test_other", (1, 1, 1))  # `_` is not a LIKE wildcard here
    pages = []
    token = ""
    while True:
        page = await api.admin.ListPrices(
            pb.ListPricesRequest(prefix="zz-test/", page_size=3, page_token=token)
        )
        pages.append([p.model for p in page.prices])
        token = page.next_page_token
        if not token:
            break
    assert pages == [models[:3], models[3:6], models[6:]]
    assert [p.model for p in await all_prices(api, "zz-test_")] == ["zz-test_other"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.admin.ListPrices(pb.ListPricesRequest(page_token="not a token!"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_delete_price_falls_back_to_the_family(api: Stubs) -> None:
    await set_price(api, "acme-del", (1 * DOLLAR_PER_MTOK, 0, 0))
    await set_price(api, "acme-del-20310101", (2 * DOLLAR_PER_MTOK, 0, 0))
    await create(api, "usd:del", 10 * USD, unit=pb.UNIT_USD)
    usage = pb.Usage(input_tokens=1_000_000)
    _, committed = await charge(api, "usd:del", "acme-del-20310101", usage, usage)
    assert committed.charged == 2 * USD
    await api.admin.DeletePrice(pb.DeletePriceRequest(model="acme-del-20310101"))
    assert await get_price(api, "acme-del-20310101") is None
    _, committed = await charge(api, "usd:del", "acme-del-20310101", usage, usage)
    assert committed.charged == 1 * USD
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.admin.DeletePrice(pb.DeletePriceRequest(model="acme-del-20310101"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.admin.DeletePrice(pb.DeletePriceRequest(model=""))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_import_litellm_file(
    api: Stubs, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    await set_price(api, "gpt-x", (1, 1, 1))  # replaced by the import
    response = await api.admin.ImportPrices(
        pb.ImportPricesRequest(litellm_json=litellm_file(SMALL_LITELLM), source="test file v1")
    )
    assert (response.imported, response.skipped) == (len(SMALL_IMPORTED), SMALL_SKIPPED)
    for model, expected in SMALL_IMPORTED.items():
        stored = await get_price(api, model)
        assert stored is not None, model
        assert amounts(stored) == expected, model
        assert (stored.source, stored.updated_at_us) == ("test file v1", clock.now_us())
    for model in ("acme/embedder", "acme/no-output-price", "acme/noisy", "sample_spec"):
        assert await get_price(api, model) is None, model

    # The imported price charges: 1,000 input (400 cached) and 500 output of gpt-x.
    await create(api, "usd:imported", USD, unit=pb.UNIT_USD)
    usage = pb.Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=500)
    _, committed = await charge(api, "usd:imported", "gpt-x", usage, usage)
    assert committed.charged == (600 * 150 + 400 * 75 + 500 * 600)  # $0.00042

    # Without a source the import is dated by the server's clock.
    caplog.set_level(logging.INFO, logger="budgetd.prices")
    again = await api.admin.ImportPrices(
        pb.ImportPricesRequest(litellm_json=litellm_file({"gpt-x": SMALL_LITELLM["gpt-x"]}))
    )
    assert (again.imported, again.skipped) == (1, 0)
    stored = await get_price(api, "gpt-x")
    assert stored is not None
    assert stored.source.startswith("import (20")
    logged = [r.getMessage() for r in caplog.records if r.name == "budgetd.prices"]
    assert logged[-1].endswith(f"source {stored.source!r}")  # the source recorded, not ''


async def test_import_refuses_malformed_files(api: Stubs) -> None:
    cases = {
        b"": "empty",
        b'{"gpt-x": {"mode": "chat",': "not valid JSON",
        b"\xff\xfe{}": "not UTF-8",
        b"[1, 2]": "JSON object",
        b'{"m": {"mode": "chat", "input_cost_per_token": NaN}}': "NaN",
        b"{}" + b" " * IMPORT_BYTES_MAX: "maximum",
        b"[" * 100_000 + b"]" * 100_000: "nests its JSON too deeply",
        b'{"m": {"mode": "chat", "input_cost_per_token": 1' + b"0" * 5000 + b"}}": "too long",
    }
    for raw, words in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.admin.ImportPrices(pb.ImportPricesRequest(litellm_json=raw))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, words
        assert words in (caught.value.details() or ""), caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.admin.ImportPrices(pb.ImportPricesRequest(litellm_json=b"{}", source="s" * 257))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_import_takes_a_file_as_large_as_litellms(api: Stubs) -> None:
    """LiteLLM's file is about 3.5 MB, above gRPC's 4 MiB default receive limit soon."""
    padding = {
        f"pad/embedder-{n}": {"mode": "embedding", "input_cost_per_token": 1e-07, "note": "x" * 200}
        for n in range(25_000)
    }
    raw = litellm_file({**padding, "gpt-x": SMALL_LITELLM["gpt-x"]})
    assert 4 * 2**20 < len(raw) < IMPORT_BYTES_MAX
    response = await api.admin.ImportPrices(pb.ImportPricesRequest(litellm_json=raw))
    assert (response.imported, response.skipped) == (1, 25_000)


# ---------------------------------------------------------------- the shipped table


async def test_shipped_table_loads_on_a_fresh_database(api: Stubs) -> None:
    shipped = shipped_table()
    assert shipped.source.startswith("litellm ")
    gpt_4o = await get_price(api, "gpt-4o")
    assert gpt_4o is not None
    assert amounts(gpt_4o) == GPT_4O
    assert gpt_4o.source == shipped.source
    everything = await all_prices(api)
    assert len(everything) == len(shipped.prices)
    assert {p.source for p in everything} == {shipped.source}


async def test_seeding_only_fills_an_empty_table(
    server: BudgetServer, api: Stubs, clock: ManualClock
) -> None:
    await set_price(api, "gpt-4o", (1, 1, 1))
    await api.admin.DeletePrice(pb.DeletePriceRequest(model="gpt-4o-mini"))
    # A second server (a restart, or another replica) on the same database.
    config = dataclasses.replace(server.config, listen="127.0.0.1:0")
    async with BudgetServer(config, clock=clock) as second, stubs(second.address) as api2:
        gpt_4o = await get_price(api2, "gpt-4o")
        assert gpt_4o is not None
        assert (amounts(gpt_4o), gpt_4o.source) == ((1, 1, 1), "manual")
        assert await get_price(api2, "gpt-4o-mini") is None


def test_every_shipped_price_is_an_exact_integer() -> None:
    doc = json.loads(SHIPPED.read_text(encoding="utf-8"))
    assert doc["format"] == "budgetd-prices/1"
    assert (
        doc["source"]
        == f"litellm {doc['litellm_version']} ({doc['file_date'] or doc['converted_on']})"
    )
    assert doc["columns"] == ["input", "cached_input", "output"]
    assert doc["models"] == len(doc["prices"]) > 1000
    for model, row in doc["prices"].items():
        assert len(row) == 3, model
        assert all(type(v) is int and 0 <= v <= AMOUNT_MAX for v in row), model
    assert doc["prices"]["gpt-4o"] == list(GPT_4O)
    assert doc["prices"]["gpt-4o-mini"] == [150_000_000, 75_000_000, 600_000_000]
    # LiteLLM lists Claude 3.5 Sonnet under provider names only (Bedrock, Vertex, ...).
    sonnets = {m: r for m, r in doc["prices"].items() if "claude-3-5-sonnet" in m}
    assert sonnets
    assert all(
        row[0] >= 3 * DOLLAR_PER_MTOK and row[2] >= 15 * DOLLAR_PER_MTOK for row in sonnets.values()
    )
    assert sonnets["vertex_ai/claude-3-5-sonnet"] == [3 * 10**9, 3 * 10**9, 15 * 10**9]
    assert "azure/gpt-4o" in doc["prices"]  # provider-prefixed names are kept too
    assert SHIPPED.stat().st_size < 400_000


def bundled_wheel() -> Path | None:
    given = os.environ.get("BUDGETD_LITELLM_WHEEL")
    found = [given] if given else sorted(glob.glob("/tmp/litellm_dl/litellm-*.whl"))
    return Path(found[-1]) if found and Path(found[-1]).exists() else None


def test_bundled_litellm_file_converts_to_the_shipped_table(tmp_path: Path) -> None:
    wheel = bundled_wheel()
    if wheel is None:
        pytest.skip("no litellm wheel: set BUDGETD_LITELLM_WHEEL to test against LiteLLM's file")
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(WHEEL_MEMBER)
    conversion = parse(raw)
    data = json.loads(raw)
    for p in conversion.prices:
        entry = data[p.model]
        assert p.input_nanousd_per_mtok * 10**-15 == pytest.approx(entry["input_cost_per_token"])
        assert p.output_nanousd_per_mtok * 10**-15 == pytest.approx(entry["output_cost_per_token"])
    assert all("not a whole number" in why for why in conversion.refused.values())
    names = {p.model for p in conversion.prices}
    assert {"gpt-4o", "gpt-4o-mini", "vertex_ai/claude-3-5-sonnet"} <= names

    # The script, run on the wheel, writes the table that ships (up to its run date).
    out = tmp_path / "prices.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "update_prices.py"), str(wheel), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    written, shipped = json.loads(out.read_text()), json.loads(SHIPPED.read_text())
    if written["litellm_version"] != shipped["litellm_version"]:
        pytest.skip(f"the wheel is litellm {written['litellm_version']}, not the shipped one")
    for doc in (written, shipped):
        del doc["converted_on"], doc["source"]
    assert written == shipped


def test_script_converts_a_litellm_json(tmp_path: Path) -> None:
    source = tmp_path / "model_prices_and_context_window.json"
    source.write_bytes(litellm_file(SMALL_LITELLM))
    out = tmp_path / "prices.json"
    done = subprocess.run(
        [
            sys.executable, str(ROOT / "scripts" / "update_prices.py"), str(source),
            "--out", str(out), "--litellm-version", "9.9.9", "--file-date", "2031-01-02",
        ],
        capture_output=True, text=True, check=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert "refused acme/noisy" in done.stderr
    converted = parse(out.read_bytes())
    assert converted.source == "litellm 9.9.9 (2031-01-02)"
    assert {
        p.model: (
            p.input_nanousd_per_mtok,
            p.cached_input_nanousd_per_mtok,
            p.output_nanousd_per_mtok,
        )
        for p in converted.prices
    } == SMALL_IMPORTED
    assert "acme/noisy" in json.loads(out.read_text())["refused"]


# ---------------------------------------------------------------- the converter


@pytest.mark.parametrize(
    ("usd_per_token", "expected"),
    [
        (1.5e-07, 150_000_000),  # 1.4999999999999999321...e-07 as a binary float
        (2.5e-06, 2_500_000_000),
        (7.5e-08, 75_000_000),
        (3.75e-08, 37_500_000),
        (1e-15, 1),
        (0, 0),
        (0.0, 0),
        (1, 10**15),
    ],
)
def test_converter_is_exact(usd_per_token: float, expected: int) -> None:
    assert nanousd_per_mtok(usd_per_token) == expected


@pytest.mark.parametrize(
    "value",
    [2.9999900000000002e-06, 1e-16, -1e-06, math.nan, math.inf, True, "1e-06", None, 1e10],
)
def test_converter_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        nanousd_per_mtok(value)


def test_convert_reports_what_it_skips_and_refuses() -> None:
    conversion = convert(SMALL_LITELLM)
    assert {p.model for p in conversion.prices} == set(SMALL_IMPORTED)
    assert [p.model for p in conversion.prices] == sorted(SMALL_IMPORTED)
    assert conversion.skipped == 3
    assert list(conversion.refused) == ["acme/noisy"]
    assert "2999990000.0000002" in conversion.refused["acme/noisy"]
    with pytest.raises(PriceFileError):
        convert([SMALL_LITELLM])
    long_name = convert({"m" * 129: SMALL_LITELLM["gpt-x"], "bad name": SMALL_LITELLM["gpt-x"]})
    assert set(long_name.refused) == {"m" * 129, "bad name"}


def test_prices_read_as_dollars_per_million_tokens() -> None:
    assert per_mtok(2_500_000_000) == "$2.50"
    assert per_mtok(37_500_000) == "$0.0375"
    assert per_mtok(1) == "$0.000000001"


# ---------------------------------------------------------------- budgetctl


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.code == 0, f"exit {self.code}: {self.stderr}"
        return json.loads(self.stdout)


async def budgetctl(server: BudgetServer, *args: str) -> Run:
    """budgetctl as a child process: the server runs in this test's event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "budget_server.ctl.main", "--server", server.address, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


async def test_budgetctl_prices_import(server: BudgetServer, api: Stubs, tmp_path: Path) -> None:
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_bytes(litellm_file(SMALL_LITELLM))
    as_json, for_people = await asyncio.gather(
        budgetctl(server, "--json", "prices", "import", str(path), "--source", "litellm test"),
        budgetctl(server, "prices", "import", str(path), "--source", "litellm test"),
    )
    assert as_json.json() == {"imported": len(SMALL_IMPORTED), "skipped": SMALL_SKIPPED}
    assert for_people.code == 0, for_people.stderr
    assert f"imported {len(SMALL_IMPORTED)} prices" in for_people.stdout
    stored = await get_price(api, "gpt-x")
    assert stored is not None
    assert (amounts(stored), stored.source) == (SMALL_IMPORTED["gpt-x"], "litellm test")

    broken = tmp_path / "broken.json"
    broken.write_text('{"gpt-x": ')
    failed, missing = await asyncio.gather(
        budgetctl(server, "prices", "import", str(broken)),
        budgetctl(server, "prices", "import", str(tmp_path / "nope.json")),
    )
    assert failed.code == 2
    assert "INVALID_ARGUMENT" in failed.stderr
    assert "not valid JSON" in failed.stderr
    assert missing.code == 2
    assert "cannot read" in missing.stderr


async def test_budgetctl_prices_set_show_list_delete(server: BudgetServer, api: Stubs) -> None:
    made = await budgetctl(
        server, "--json", "prices", "set", "acme-ctl",
        "--input", "$2.50", "--cached-input", "$1.25", "--output", "$10",
    )  # fmt: skip
    stored = made.json()["price"]
    assert stored["model"] == "acme-ctl"
    assert (
        stored["input_nanousd_per_mtok"],
        stored["cached_input_nanousd_per_mtok"],
        stored["output_nanousd_per_mtok"],
    ) == GPT_4O
    assert stored["source"] == "manual"
    no_cache = await budgetctl(
        server, "--json", "prices", "set", "acme-ctl-mini", "--input", "0.0375", "--output", "1"
    )
    assert no_cache.json()["price"]["cached_input_nanousd_per_mtok"] == 37_500_000

    dated, table, listed, unknown, bad_amount = await asyncio.gather(
        budgetctl(server, "--json", "prices", "show", "acme-ctl-2031-01-01"),
        budgetctl(server, "prices", "show", "acme-ctl"),
        budgetctl(server, "prices", "list", "--prefix", "acme-ctl"),
        budgetctl(server, "prices", "show", "mystery-model-9"),
        budgetctl(server, "prices", "set", "x", "--input", "$0.0000000001", "--output", "1"),
    )
    shown = dated.json()
    assert (shown["model"], shown["priced_as"]) == ("acme-ctl-2031-01-01", "acme-ctl")
    assert shown["price"]["output_nanousd_per_mtok"] == 10 * DOLLAR_PER_MTOK
    assert table.code == 0, table.stderr
    assert "input         $2.50 per 1M tokens (2,500,000,000 nano-USD)" in table.stdout
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:4] == ["MODEL", "INPUT/1M", "CACHED/1M", "OUTPUT/1M"]
    assert [row.split()[:4] for row in rows] == [
        ["acme-ctl", "$2.50", "$1.25", "$10.00"],
        ["acme-ctl-mini", "$0.0375", "$0.0375", "$1.00"],
    ]
    assert unknown.code == 2
    assert "no price for 'mystery-model-9'" in unknown.stderr
    assert bad_amount.code == 2
    assert "--input" in bad_amount.stderr

    await set_price(api, "*", (1, 1, 1))
    fallback = await budgetctl(server, "--json", "prices", "show", "mystery-model-9")
    assert fallback.json()["priced_as"] == "*"

    deleted = await budgetctl(server, "--json", "prices", "delete", "acme-ctl")
    assert deleted.json() == {"deleted": "acme-ctl"}
    assert await get_price(api, "acme-ctl") is None
    again = await budgetctl(server, "prices", "delete", "acme-ctl")
    assert again.code == 2
    assert "NOT_FOUND" in again.stderr
