"""A grpcio client of the Control API (`citygw.v1.Control`: commands to devices, alerts), built
from proto/ like the agency client (support/telemetry.py), with one bearer token per client:
the admin token or an agency's.

- `ControlClient.send(...)`, `.get(id)`, `.list(...)`, `.watch(...)` -> `Watch` (a reader thread
  collecting changes, with condition waits).
- `state_name(n)`: "QUEUED", "SUCCEEDED", ... for a CommandState number.
"""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import Any, Callable

import grpc

from . import Gateway, hostport


def state_name(api: SimpleNamespace, n: int) -> str:
    return api.control_pb2.CommandState.Name(n).removeprefix("COMMAND_STATE_")


class Watch:
    """A live Watch* call whose items a background thread collects."""

    def __init__(self, call: Any):
        self.call = call
        self.items: list[Any] = []
        self.error: grpc.RpcError | None = None
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for item in self.call:
                with self._cv:
                    self.items.append(item)
                    self._cv.notify_all()
        except grpc.RpcError as e:
            with self._cv:
                self.error = e
                self._cv.notify_all()

    def wait_for(self, pred: Callable[[list[Any]], bool], timeout: float = 15.0) -> list[Any]:
        with self._cv:
            ok = self._cv.wait_for(lambda: pred(self.items) or self.error is not None, timeout)
            assert ok and (self.error is None or self.error.code() == grpc.StatusCode.CANCELLED), (
                f"watch: condition not met within {timeout}s (error {self.error}); "
                f"got {len(self.items)} items")
            return list(self.items)

    def cancel(self) -> None:
        self.call.cancel()


class ControlClient:
    def __init__(self, gw: Gateway, api: SimpleNamespace, token: str | None):
        self.api = api
        self.pb = api.control_pb2
        self.channel = grpc.insecure_channel(hostport(gw.host, gw.grpc_port))
        self.stub = api.control_pb2_grpc.ControlStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        self._watches: list[Watch] = []

    def state(self, n: int) -> str:
        return state_name(self.api, n)

    def payload(self, params: dict | None = None, raw: bytes | None = None,
                lwm2m: tuple[str, str, str] | None = None) -> Any:
        """A CommandPayload: JSON params, raw bytes, or ("write"|"execute", path, value)."""
        p = self.pb.CommandPayload()
        if params is not None:
            p.params_json = json.dumps(params)
        elif raw is not None:
            p.raw = raw
        elif lwm2m is not None:
            kind, path, value = lwm2m
            p.lwm2m.CopyFrom(self.pb.Lwm2mOperation(
                kind=self.pb.Lwm2mOperation.Kind.Value(kind.upper()), path=path, value=value))
        return p

    def send(self, device_id: str, name: str, params: dict | None = None, *,
             raw: bytes | None = None, lwm2m: tuple[str, str, str] | None = None,
             ttl_ms: int = 0, confirmed: bool = False, f_port: int = 0,
             timeout: float = 15.0) -> Any:
        req = self.pb.SendCommandRequest(device_id=device_id, name=name, ttl_ms=ttl_ms,
                                         confirmed=confirmed, f_port=f_port)
        if params is not None or raw is not None or lwm2m is not None:
            req.payload.CopyFrom(self.payload(params, raw, lwm2m))
        return self.stub.SendCommand(req, metadata=self.metadata, timeout=timeout)

    def get(self, command_id: str, timeout: float = 10.0) -> Any:
        return self.stub.GetCommand(self.pb.GetCommandRequest(id=command_id),
                                    metadata=self.metadata, timeout=timeout)

    def list(self, device_id: str = "", state: str | None = None, limit: int = 0,
             timeout: float = 10.0) -> list[Any]:
        req = self.pb.ListCommandsRequest(device_id=device_id, limit=limit)
        if state:
            req.state = self.pb.CommandState.Value(f"COMMAND_STATE_{state}")
        return list(self.stub.ListCommands(req, metadata=self.metadata, timeout=timeout).commands)

    def watch(self, device_ids: list[str] = (), states: list[str] = ()) -> Watch:
        req = self.pb.WatchCommandsRequest(
            device_ids=list(device_ids),
            states=[self.pb.CommandState.Value(f"COMMAND_STATE_{s}") for s in states])
        w = Watch(self.stub.WatchCommands(req, metadata=self.metadata))
        self._watches.append(w)
        return w

    def wait_state(self, command_id: str, state: str, timeout: float = 15.0) -> Any:
        """The command once it is in `state` (polling GetCommand)."""
        from . import wait_until

        return wait_until(lambda: (c := self.get(command_id)) and self.state(c.state) == state and c,
                          timeout=timeout, desc=f"command {command_id} {state}")

    def close(self) -> None:
        for w in self._watches:
            w.cancel()
        self.channel.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
