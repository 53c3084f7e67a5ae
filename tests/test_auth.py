"""API keys, scopes, revocation, the --insecure rule and TLS, through real servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from budget_client import AccessDenied, BudgetClient
from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc
from budget_server.app import BudgetServer
from budget_server.auth.store import AdminKeyFileExists
from budget_server.config import ServerConfig
from budget_server.errors import InvalidArgument
from tests.support.servers import Stubs, server_processes, stubs

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


async def test_the_first_admin_key_never_overwrites_an_existing_file(
    db_url: str, tmp_path: Path
) -> None:
    """A key file already there may hold the only copy of another database's admin key
    (only its hash is stored): a new database's start refuses to replace it, stores no
    key, and starts once given a file of its own."""
    taken = tmp_path / "admin.key"
    taken.write_text("bk_other-database's-key\n")
    config = ServerConfig(listen="127.0.0.1:0", db_url=db_url, admin_key_file=str(taken))
    with pytest.raises(AdminKeyFileExists, match="already exists"):
        async with BudgetServer(config):
            pass
    assert taken.read_text() == "bk_other-database's-key\n"

    fresh = tmp_path / "fresh.key"
    config = ServerConfig(listen="127.0.0.1:0", db_url=db_url, admin_key_file=str(fresh))
    async with BudgetServer(config) as server, stubs(server.address) as api:
        assert server.admin_key_path == fresh
        admin_key = fresh.read_text().strip()
        listed = await api.admin.ListKeys(pb.ListKeysRequest(), metadata=_as(admin_key))
        assert [k.name for k in listed.keys] == ["bootstrap-admin"]


def _as(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def _new_key(api: Stubs, admin_key: str, *scopes: str) -> str:
    response = await api.admin.CreateKey(
        pb.CreateKeyRequest(name="test", scopes=list(scopes)), metadata=_as(admin_key)
    )
    return response.secret


async def _code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _first_answer(read: Any) -> grpc.StatusCode:
    """A stream's status: its error, or OK once it has answered or stayed open a moment."""
    try:
        await asyncio.wait_for(read, 1)
    except TimeoutError:
        return grpc.StatusCode.OK  # admitted: a watch stream is quiet until something happens
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _every_rpc(channel: grpc.aio.Channel, metadata: Any) -> dict[str, grpc.StatusCode]:
    """Call every method of both services with an empty request; the status of each."""
    codes: dict[str, grpc.StatusCode] = {}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            request_cls = getattr(pb, method.input_type.name)
            response_cls = getattr(pb, method.output_type.name)
            kwargs = {
                "request_serializer": request_cls.SerializeToString,
                "response_deserializer": response_cls.FromString,
            }
            if method.client_streaming:
                call = channel.stream_stream(path, **kwargs)(metadata=metadata)
                with contextlib.suppress(grpc.aio.AioRpcError):  # refused before the write
                    await call.write(request_cls(open=pb.MeterOpen(budget_id="auth:a", model="m")))
                codes[path] = await _first_answer(call.read())
                call.cancel()
            elif method.server_streaming:
                call = channel.unary_stream(path, **kwargs)(request_cls(), metadata=metadata)
                codes[path] = await _first_answer(call.read())
                call.cancel()
            else:
                codes[path] = await _code_of(
                    channel.unary_unary(path, **kwargs)(request_cls(), metadata=metadata)
                )
    return codes


async def test_the_first_admin_key_is_written_for_the_owner_only(
    secured: tuple[BudgetServer, str],
) -> None:
    server, admin_key = secured
    assert server.admin_key_path is not None
    mode = stat.S_IMODE(os.stat(server.admin_key_path).st_mode)
    assert mode == 0o600
    assert admin_key.startswith("bdk_")


async def test_every_rpc_refuses_missing_wrong_and_revoked_keys(
    secured: tuple[BudgetServer, str],
) -> None:
    server, admin_key = secured
    async with stubs(server.address) as api:
        await create_as(api, admin_key, "auth:a")
        revoked = await _new_key(api, admin_key, "admin")
        key_id = revoked.split("_")[1]
        await api.admin.RevokeKey(pb.RevokeKeyRequest(id=key_id), metadata=_as(admin_key))
        wrong = admin_key[:-4] + ("AAAA" if not admin_key.endswith("AAAA") else "BBBB")
        method_count = sum(len(s.methods) for s in pb.DESCRIPTOR.services_by_name.values())
        for metadata in ((), _as("not-a-key"), _as(wrong), _as(revoked)):
            codes = await _every_rpc(api.channel, metadata)
            assert len(codes) == method_count
            assert set(codes.values()) == {UNAUTHENTICATED}, codes
        # The admin key passes authentication everywhere (what follows is each call's own
        # answer to an empty request).
        codes = await _every_rpc(api.channel, _as(admin_key))
        assert UNAUTHENTICATED not in codes.values()
        assert DENIED not in codes.values()
        # Health stays open for load balancers.
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(api.channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def create_as(api: Stubs, key: str, budget_id: str, limit: int = 1000) -> None:
    await api.admin.CreateBudget(
        pb.CreateBudgetRequest(id=budget_id, unit=pb.UNIT_TOKENS, limit=limit), metadata=_as(key)
    )


async def test_scopes_limit_keys_to_their_budgets(secured: tuple[BudgetServer, str]) -> None:
    server, admin_key = secured
    async with stubs(server.address) as api:
        for budget_id in ("team:a", "team:a/app", "team:b"):
            await create_as(api, admin_key, budget_id)
        charge_a = await _new_key(api, admin_key, "charge:team:a*")
        reader = await _new_key(api, admin_key, "read:team:*")
        other = await api.budget.Reserve(
            pb.ReserveRequest(budget_id="team:b", amount=5), metadata=_as(admin_key)
        )
        allowed = [
            api.budget.Reserve(
                pb.ReserveRequest(budget_id="team:a", amount=5), metadata=_as(charge_a)
            ),
            api.budget.Reserve(
                pb.ReserveRequest(budget_id="team:a/app", amount=5), metadata=_as(charge_a)
            ),
            api.budget.GetBudget(pb.GetBudgetRequest(budget_id="team:a"), metadata=_as(charge_a)),
            api.admin.ListBudgets(pb.ListBudgetsRequest(prefix="team:a"), metadata=_as(charge_a)),
            api.budget.GetBudget(pb.GetBudgetRequest(budget_id="team:b"), metadata=_as(reader)),
            api.admin.ListBudgets(pb.ListBudgetsRequest(prefix="team:"), metadata=_as(reader)),
            api.admin.ListLedgerEntries(
                pb.ListLedgerEntriesRequest(budget_id="team:b"), metadata=_as(reader)
            ),
        ]
        for call in allowed:
            assert await _code_of(call) == grpc.StatusCode.OK
        denied = [
            api.budget.Reserve(
                pb.ReserveRequest(budget_id="team:b", amount=5), metadata=_as(charge_a)
            ),
            api.budget.Commit(
                pb.CommitRequest(reservation_id=other.reservation.id, amount=1),
                metadata=_as(charge_a),
            ),
            api.budget.Release(
                pb.ReleaseRequest(reservation_id=other.reservation.id), metadata=_as(charge_a)
            ),
            api.budget.GetBudget(pb.GetBudgetRequest(budget_id="team:b"), metadata=_as(charge_a)),
            api.admin.ListBudgets(pb.ListBudgetsRequest(prefix=""), metadata=_as(charge_a)),
            api.admin.VerifyLedger(pb.VerifyLedgerRequest(), metadata=_as(charge_a)),
            api.admin.CreateBudget(
                pb.CreateBudgetRequest(id="team:a/new", unit=pb.UNIT_TOKENS, limit=1),
                metadata=_as(charge_a),
            ),
            api.admin.FreezeBudget(pb.FreezeBudgetRequest(id="team:a"), metadata=_as(charge_a)),
            api.admin.CreateKey(
                pb.CreateKeyRequest(name="x", scopes=["admin"]), metadata=_as(charge_a)
            ),
            api.budget.Reserve(
                pb.ReserveRequest(budget_id="team:a", amount=5), metadata=_as(reader)
            ),
        ]
        for call in denied:
            assert await _code_of(call) == DENIED
        meter = api.budget.Meter(metadata=_as(charge_a))
        await meter.write(pb.MeterRequest(open=pb.MeterOpen(budget_id="team:b", model="m")))
        assert await _code_of(meter.read()) == DENIED
        # A resume is checked against the budget that owns the reservation, not the one
        # the open message names.
        resume = api.budget.Meter(metadata=_as(charge_a))
        await resume.write(
            pb.MeterRequest(
                open=pb.MeterOpen(
                    budget_id="team:a", model="m", resume_reservation_id=other.reservation.id
                )
            )
        )
        assert await _code_of(resume.read()) == DENIED
        budget_b = await api.budget.GetBudget(
            pb.GetBudgetRequest(budget_id="team:b"), metadata=_as(admin_key)
        )
        assert budget_b.budget.reserved == 5  # nothing the denied calls tried took effect


async def test_the_client_sends_its_key_and_surfaces_refusals(
    secured: tuple[BudgetServer, str],
) -> None:
    server, admin_key = secured
    async with stubs(server.address) as api:
        await create_as(api, admin_key, "client:a")
        key = await _new_key(api, admin_key, "charge:client:a")
    async with BudgetClient(server.address, api_key=key) as client:
        reservation = await client.reserve("client:a", 10)
        assert reservation.granted == 10
    async with BudgetClient(server.address, api_key="bdk_" + "0" * 16 + "_" + "x" * 43) as client:
        with pytest.raises(AccessDenied) as caught:
            await client.reserve("client:a", 10)
        assert caught.value.code == UNAUTHENTICATED
        with pytest.raises(AccessDenied):  # fail-open never hides a bad key
            await client.meter("client:a", model="gpt-4o").open()


@pytest.mark.postgres
@pytest.mark.slow
async def test_revocation_takes_effect_at_once_on_every_process(
    postgres_url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "admin.key"
    async with server_processes(
        postgres_url, 2, "--admin-key-file", str(key_file), insecure=False
    ) as servers:
        admin_key = key_file.read_text().strip()
        async with stubs(servers[0].address) as first, stubs(servers[1].address) as second:
            await create_as(first, admin_key, "revoke:a")
            key = await _new_key(first, admin_key, "charge:revoke:*")
            request = pb.ReserveRequest(budget_id="revoke:a", amount=1)
            # Both processes know (and cache) the key...
            await first.budget.Reserve(request, metadata=_as(key))
            await second.budget.Reserve(request, metadata=_as(key))
            await first.admin.RevokeKey(
                pb.RevokeKeyRequest(id=key.split("_")[1]), metadata=_as(admin_key)
            )
            # ...and both refuse it at once, the second one told over NOTIFY.
            assert (
                await _code_of(first.budget.Reserve(request, metadata=_as(key))) == UNAUTHENTICATED
            )
            loop = asyncio.get_running_loop()
            started = loop.time()
            while (
                await _code_of(second.budget.Reserve(request, metadata=_as(key))) != UNAUTHENTICATED
            ):
                assert loop.time() - started < 1, "revocation did not reach the other process"
                await asyncio.sleep(0.01)


async def test_insecure_is_refused_off_loopback(db_url: str) -> None:
    server = BudgetServer(ServerConfig(listen="0.0.0.0:0", db_url=db_url, insecure=True))
    with pytest.raises(InvalidArgument, match="--insecure"):
        await server.start()
    await server.stop()


async def test_tls_and_mutual_tls(db_url: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    server_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert = ca.issue_cert("app@example.test")
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    config = ServerConfig(
        listen="127.0.0.1:0",
        db_url=db_url,
        insecure=True,
        tls_cert_file=str(tmp_path / "server.pem"),
        tls_key_file=str(tmp_path / "server.key"),
        tls_client_ca_file=str(tmp_path / "ca.pem"),
    )
    async with BudgetServer(config) as server:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(tmp_path / "ca.pem").read_bytes(),
            private_key=(tmp_path / "client.key").read_bytes(),
            certificate_chain=(tmp_path / "client.pem").read_bytes(),
        )
        async with grpc.aio.secure_channel(server.address, credentials) as channel:
            admin = pb_grpc.AdminServiceStub(channel)
            await admin.CreateBudget(
                pb.CreateBudgetRequest(id="tls:a", unit=pb.UNIT_TOKENS, limit=9)
            )
        async with BudgetClient(
            server.address,
            tls_ca_file=str(tmp_path / "ca.pem"),
            tls_cert_file=str(tmp_path / "client.pem"),
            tls_key_file=str(tmp_path / "client.key"),
        ) as client:
            assert (await client.get_budget("tls:a")).limit == 9
        # No client certificate, or no TLS at all: the handshake fails.
        for client in (
            BudgetClient(server.address, tls_ca_file=str(tmp_path / "ca.pem"), timeout_s=2),
            BudgetClient(server.address, timeout_s=2),
        ):
            async with client:
                with pytest.raises(Exception) as caught:
                    await client.get_budget("tls:a")
                assert getattr(caught.value, "code", None) in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
