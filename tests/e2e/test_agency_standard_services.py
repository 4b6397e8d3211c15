"""Standard gRPC services on the gateway's gRPC port, used through the stock Python clients:
health checking (grpcio-health-checking) and server reflection (grpcio-reflection), so tools
such as grpcurl work without the .proto files.

Reflection is checked end to end: a client that has no .proto files at all learns the
Telemetry service from the server, builds its messages from the descriptors it received, and
calls ListDevices with them.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from support import Gateway, hostport, publish_json, unique_id

SERVING = health_pb2.HealthCheckResponse.SERVING
TELEMETRY = "citygw.v1.Telemetry"
# grpc.reflection.v1 has the same messages as v1alpha (only the package differs): the stock
# v1alpha classes serialise v1 requests byte for byte.
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


@pytest.fixture
def channel(gw: Gateway):
    ch = grpc.insecure_channel(hostport(gw.host, gw.grpc_port))
    try:
        yield ch
    finally:
        ch.close()


@pytest.mark.parametrize("service", ["", TELEMETRY, "citygw.v1.Admin"])
def test_health_reports_serving_without_any_token(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert resp.status == SERVING, resp


def test_health_of_an_unknown_service_is_not_found(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Check(health_pb2.HealthCheckRequest(service="citygw.v1.NoSuchService"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def reflect_v1(channel, **request) -> reflection_pb2.ServerReflectionResponse:
    call = channel.stream_stream(REFLECTION_V1,
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    responses = list(call(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10))
    assert len(responses) == 1, responses
    assert not responses[0].HasField("error_response"), responses[0].error_response
    return responses[0]


def pool_from_v1(channel, symbol: str) -> descriptor_pool.DescriptorPool:
    """A descriptor pool holding `symbol`'s file and its imports, all fetched by reflection."""
    pool = descriptor_pool.DescriptorPool()
    files: dict[str, FileDescriptorProto] = {}

    def take(resp) -> None:
        for raw in resp.file_descriptor_response.file_descriptor_proto:
            fd = FileDescriptorProto.FromString(raw)
            files.setdefault(fd.name, fd)

    take(reflect_v1(channel, file_containing_symbol=symbol))
    missing = [dep for fd in list(files.values()) for dep in fd.dependency if dep not in files]
    while missing:
        take(reflect_v1(channel, file_by_filename=missing.pop()))
        missing = [dep for fd in list(files.values()) for dep in fd.dependency if dep not in files]

    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        for dep in files[name].dependency:
            add(dep)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    return pool


def check_telemetry_descriptor(pool) -> None:
    svc = pool.FindServiceByName(TELEMETRY)
    methods = {m.name: m for m in svc.methods}
    assert {"Subscribe", "QueryHistory", "ListDevices", "GetDevice"} <= set(methods), sorted(methods)
    assert methods["Subscribe"].output_type.full_name == "citygw.v1.Reading"
    assert methods["Subscribe"].server_streaming and methods["QueryHistory"].server_streaming
    assert "unit" in methods["Subscribe"].output_type.fields_by_name


def test_reflection_v1_lists_and_describes_telemetry_well_enough_to_call_it(gw: Gateway, channel):
    services = {s.name for s in reflect_v1(channel, list_services="").list_services_response.service}
    assert {TELEMETRY, "citygw.v1.Admin", "grpc.health.v1.Health"} <= services, services

    pool = pool_from_v1(channel, TELEMETRY)
    check_telemetry_descriptor(pool)

    # a client with no .proto files: messages built from the reflected descriptors only
    tenant = unique_id("city")
    agency = gw.add_agency(tenants=[tenant], kinds=["*"])
    dev = gw.add_device(tenant=tenant, kind="weather", commune="00004")
    publish_json(gw, dev, {"seq": 1, "temp": 30.0})
    method = pool.FindMethodByName(f"{TELEMETRY}.ListDevices")
    Req = message_factory.GetMessageClass(method.input_type)
    Resp = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(f"/{TELEMETRY}/ListDevices", request_serializer=Req.SerializeToString,
                               response_deserializer=Resp.FromString)
    resp = call(Req(), metadata=[("authorization", f"Bearer {agency.token}")], timeout=10)
    assert [(d.id, d.tenant, d.kind, d.commune_code) for d in resp.devices] == [
        (dev.id, tenant, "weather", "00004")]


def test_reflection_with_the_stock_grpcio_reflection_client(channel):
    """grpcio-reflection's ProtoReflectionDescriptorDatabase (as Python tools use it) speaks
    grpc.reflection.v1alpha, as do many deployed tools; the server must answer it too."""
    db = ProtoReflectionDescriptorDatabase(channel)
    try:
        services, failure = set(db.get_services()), None
    except grpc.RpcError as e:
        services, failure = set(), f"{e.code().name} {e.details()!r}"
    assert failure is None, (f"grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo -> "
                             f"{failure}: the stock Python reflection client cannot list services")
    assert TELEMETRY in services, services
    pool = descriptor_pool.DescriptorPool(db)
    check_telemetry_descriptor(pool)
    fd = db.FindFileContainingSymbol(TELEMETRY)
    assert fd.package == "citygw.v1" and any(s.name == "Telemetry" for s in fd.service)
